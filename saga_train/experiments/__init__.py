"""Experiment scripts on the synthetic world: the ablation table and training-curve plots."""
