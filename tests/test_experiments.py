"""Ablation script plumbing (configs per arm, summary, files written) and the training-curve plot."""
import json

import pytest
from PIL import Image

from saga_train.config import Config
from saga_train.experiments import ablation, plot


def test_arm_configs(tmp_path):
    base = Config()
    cfgs = {arm: ablation.arm_config(base, arm, 2, "/models/sup", tmp_path) for arm in ablation.ARMS}
    assert all(c.model == "/models/sup" and c.seed == 2 and not c.progress for c in cfgs.values())
    assert cfgs["tower_mean_pool"].pooler == "mean"
    assert (cfgs["pf"].lambda_lm, cfgs["pf"].lambda_kl, cfgs["pf"].lambda_dml) == (0.0, 0.0, 1.0)
    assert (cfgs["pf_grpo"].lambda_lm, cfgs["pf_grpo"].lambda_kl) == (base.lambda_lm, 0.0)
    assert (cfgs["pf_kl"].lambda_lm, cfgs["pf_kl"].lambda_kl) == (0.0, base.lambda_kl)
    assert cfgs["saga"].prompt == "dataset" and cfgs["saga_generic"].prompt == "generic"
    for arm in ("saga", "saga_generic"):  # full SAGA: every loss on, the attention pooler
        c = cfgs[arm]
        assert (c.lambda_dml, c.lambda_lm, c.lambda_kl, c.pooler) == (1.0, base.lambda_lm, base.lambda_kl, "attention")
    assert len({c.run_dir for c in cfgs.values()}) == len(ablation.ARMS)
    with pytest.raises(ValueError, match="unknown arm"):
        ablation.arm_config(base, "nope", 0, "/m", tmp_path)


def test_summarize_and_markdown():
    runs = {"pf": {0: {"R@1": 0.5, "NMI": 0.2}, 1: {"R@1": 0.7, "NMI": 0.4}}, "saga": {0: {"R@1": 0.9}}}
    summary = ablation.summarize(runs)
    assert summary["pf"]["R@1"]["mean"] == pytest.approx(0.6)
    assert summary["pf"]["R@1"]["std"] == pytest.approx(0.1414213562)
    assert summary["saga"]["R@1"] == {"mean": 0.9, "std": 0.0, "n": 1}
    sup_metrics = {0: {"heldout": {"verdict_accuracy": 0.875, "attribute_accuracy": 0.99,
                                   "verdict_accuracy_by_kind": {"same": 0.8, "one_attribute": 0.9, "random": 1.0}}}}
    text = ablation.markdown(summary, sup_metrics, {"seeds": 2, "seed_list": [0, 1], "note": "n"})
    assert "| pf | 0.600 ± 0.141 | – | 0.300 ± 0.141 |" in text
    assert "| 0 | 0.875 | 0.990 | 0.80 / 0.90 / 1.00 |" in text


def test_run_ablation_writes_table(tmp_path, monkeypatch):
    calls = []

    def fake_run(cfg, arm):
        calls.append((arm, cfg.seed, cfg.model))
        return {"R@1": 0.1 * cfg.seed + len(arm) / 100, "R@4": 0.5, "NMI": 0.3, "wall_seconds": 1.0}

    monkeypatch.setattr(ablation, "run_arm", fake_run)
    monkeypatch.setattr("saga_train.synthetic.supervisor.ensure_supervisor", lambda cfg: tmp_path / f"sup{cfg.seed}")
    monkeypatch.setattr("saga_train.synthetic.supervisor.read_marker", lambda path: {"metrics": {"path": str(path)}})
    monkeypatch.setattr("saga_train.experiments.plot.plot_run", lambda run_dir: calls.append(("plot", run_dir)))
    record = ablation.run_ablation(Config(), [0, 1], ["pf", "saga"], tmp_path / "runs", tmp_path / "out",
                                   log=lambda *_: None)
    assert [c[:2] for c in calls if c[0] != "plot"] == [("pf", 0), ("saga", 0), ("pf", 1), ("saga", 1)]
    assert {c[2] for c in calls if c[0] == "saga"} == {str(tmp_path / "sup0"), str(tmp_path / "sup1")}
    assert sum(c[0] == "plot" for c in calls) == 2
    written = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert written["summary"] == json.loads(json.dumps(record["summary"]))
    assert written["summary"]["saga"]["R@1"]["mean"] == pytest.approx(0.05 + 0.04)
    assert (tmp_path / "out" / "ablation.md").read_text().startswith("# SAGA ablation")


def test_merge_per_seed_records_equals_one_run(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "run_arm", lambda cfg, arm: {"R@1": 0.1 * cfg.seed + len(arm) / 100, "NMI": 0.3})
    monkeypatch.setattr("saga_train.synthetic.supervisor.ensure_supervisor", lambda cfg: tmp_path / f"sup{cfg.seed}")
    monkeypatch.setattr("saga_train.synthetic.supervisor.read_marker", lambda path: {"metrics": {"path": str(path)}})
    monkeypatch.setattr("saga_train.experiments.plot.plot_run", lambda run_dir: None)
    both = ablation.run_ablation(Config(), [0, 1], ["pf", "saga"], tmp_path / "r", tmp_path / "both", log=print)
    for seed in (0, 1):
        ablation.run_ablation(Config(), [seed], ["pf", "saga"], tmp_path / "r", tmp_path / f"s{seed}", log=print)
    files = [str(tmp_path / f"s{seed}" / "ablation.json") for seed in (0, 1)]
    assert ablation.main(["--merge", *files, "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "ablation.json").read_text())
    assert merged["summary"] == json.loads(json.dumps(both["summary"]))
    assert merged["meta"]["seed_list"] == [0, 1] and set(merged["supervisors"]) == {"0", "1"}
    with pytest.raises(ValueError, match="appears in two records"):
        ablation.merge_records([json.loads(open(files[0]).read())] * 2)


def test_cli_rejects_bad_overrides(capsys):
    assert ablation.parse_value("200") == 200 and ablation.parse_value("true") is True
    assert ablation.parse_value("tiny-random") == "tiny-random"
    assert ablation.main(["--set", "max_steps"]) == 2
    assert ablation.main(["--set", "no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_plot_run(tmp_path):
    records = [{"eval": "before", "step": 0, "R@1": 0.4}]
    records += [{"step": s, "completions": 8, "rewarded": s % 9} for s in range(1, 13)]
    records += [{"eval": "epoch 0", "step": 12, "R@1": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    curves = plot.read_curves(tmp_path / "metrics.jsonl", window=10)
    assert curves["eval_steps"] == [0, 12] and curves["r_at_1"] == [0.4, 0.6]
    assert curves["reward"][0] == 1 / 8
    assert curves["reward_mean"][-1] == pytest.approx(sum(s % 9 for s in range(3, 13)) / 80)
    out = plot.plot_run(tmp_path)
    assert out == tmp_path / "training.png"
    with Image.open(out) as image:
        assert image.size[0] > 100 and image.size[1] > 100
    assert plot.main([str(tmp_path / "missing")]) == 2
