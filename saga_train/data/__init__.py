"""Datasets, splits and samplers for SAGA training and zero-shot retrieval evaluation."""
