"""Ablation script plumbing (configs per arm, summary, files written) and the training-curve plot."""
import json

import numpy as np
import pytest
from PIL import Image

from saga_train.config import make_config
from saga_train.experiments import ablation, mechanism, plot


def test_arm_configs(tmp_path):
    base = make_config(**ablation.PAPER_REGIME)
    cfgs = {arm: ablation.arm_config(base, arm, 2, tmp_path) for arm in ablation.ARMS}
    assert all(c.model == "synthetic-supervisor" and c.seed == 2 and c.world_seed == 0 for c in cfgs.values())
    assert (base.synthetic_train_classes == 40
            and base.synthetic_test_classes * base.synthetic_test_images_per_class >= 1000)
    assert (cfgs["dml"].lambda_lm, cfgs["dml"].lambda_kl, cfgs["dml"].lambda_dml) == (0.0, 0.0, 1.0)
    assert (cfgs["dml_grpo"].lambda_lm, cfgs["dml_grpo"].lambda_kl) == (base.lambda_lm, 0.0)
    assert (cfgs["dml_kl"].lambda_lm, cfgs["dml_kl"].lambda_kl) == (0.0, base.lambda_kl)
    assert cfgs["saga"].prompt == "dataset" and cfgs["saga_generic"].prompt == "generic"
    for arm in ("saga", "saga_generic"):  # full SAGA: every loss on
        c = cfgs[arm]
        assert (c.lambda_dml, c.lambda_lm, c.lambda_kl) == (1.0, base.lambda_lm, base.lambda_kl)
    assert len({c.run_dir for c in cfgs.values()}) == len(ablation.ARMS)
    with pytest.raises(ValueError, match="unknown arm"):
        ablation.arm_config(base, "nope", 0, tmp_path)


def _fake_run(cfg, arm):
    rng = np.random.default_rng(cfg.seed * 10 + len(arm))
    hits = (rng.random(50) < (0.8 if arm == "saga" else 0.5)).astype(int).tolist()
    verdicts = (rng.random(20) < 0.7).astype(int).tolist()
    return {"R@1": float(np.mean(hits)), "R@4": 0.5, "NMI": 0.3, "wall_seconds": 1.0, "hits": hits,
            "curve": [[0, 0.3], [10, float(np.mean(hits))]], "probe_embedding": [0.5 + cfg.seed / 10] * 6,
            "probe_tower_mean": [0.9] * 6, "verdict_right": verdicts, "readout/verdict": float(np.mean(verdicts))}


@pytest.fixture
def fake_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(ablation, "run_arm", _fake_run)
    monkeypatch.setattr("saga_train.synthetic.supervisor.shipped_or_cached", lambda cfg, log=print: tmp_path / "sup")
    sup_metrics = {"heldout": {"verdict_accuracy": 0.97, "attribute_accuracy": 0.99,
                               "verdict_accuracy_by_kind": {"same": 0.95, "one_attribute": 0.98, "random": 1.0}}}
    monkeypatch.setattr("saga_train.synthetic.store.read_marker", lambda path: {"metrics": sup_metrics})


def test_summary_leaves_out_values_a_run_did_not_have():
    runs = {"dml": {"0": {"R@1": 0.5, "reward_rate": float("nan")}, "1": {"R@1": 0.7, "reward_rate": float("nan")}},
            "saga": {"0": {"R@1": 0.9, "reward_rate": 0.8}}}
    summary = ablation.summarize(runs)
    assert "reward_rate" not in summary["dml"] and summary["dml"]["R@1"]["mean"] == pytest.approx(0.6)
    assert summary["saga"]["reward_rate"] == {"mean": 0.8, "std": 0.0, "n": 1}


def test_run_ablation_writes_tables_and_curves(tmp_path, fake_runs):
    base = make_config(**ablation.PAPER_REGIME)
    record = ablation.run_ablation(base, [0, 1], ["dml", "saga"], tmp_path / "runs", tmp_path / "out",
                                   log=lambda *_: None)
    written = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert written["summary"] == json.loads(json.dumps(record["summary"]))
    saga_r1 = [np.mean(_fake_run(ablation.arm_config(base, "saga", s, tmp_path), "saga")["hits"]) for s in (0, 1)]
    assert written["summary"]["saga"]["R@1"]["mean"] == pytest.approx(np.mean(saga_r1))
    assert set(written["paired"]) == {"saga - dml"} and set(written["paired"]["saga - dml"]) == {"R@1", "verdict"}
    for score, key in (("R@1", "hits"), ("verdict", "verdict_right")):
        assert set(written["paired"]["saga - dml"][score]) == {"0", "1"}
        for seed, d in written["paired"]["saga - dml"][score].items():
            a, b = (np.array(written["runs"][arm][seed][key]) for arm in ("saga", "dml"))
            assert d["diff"] == pytest.approx((a - b).mean()) and d["lo"] <= d["diff"] <= d["hi"]
    assert written["probes"]["dml"]["probe_embedding"] == pytest.approx([0.55] * 6)
    text = (tmp_path / "out" / "ablation.md").read_text()
    assert text.startswith("# SAGA ablation") and "| saga - dml | 0 | " in text and "95% CI" in text
    assert "supervisor's readout of each arm's final tower" in text
    assert "| dml | embedding | 0.550 |" in text and "verdict accuracy 0.970" in text
    with Image.open(tmp_path / "out" / "ablation-curves.png") as image:
        assert image.size[0] > 100


def test_merge_per_seed_records_equals_one_run(tmp_path, fake_runs):
    base = make_config(**ablation.PAPER_REGIME)
    both = ablation.run_ablation(base, [0, 1], ["dml", "saga"], tmp_path / "r", tmp_path / "both", log=print)
    for seed in (0, 1):
        ablation.run_ablation(base, [seed], ["dml", "saga"], tmp_path / "r", tmp_path / f"s{seed}", log=print)
    files = [str(tmp_path / f"s{seed}" / "ablation.json") for seed in (0, 1)]
    assert ablation.main(["--merge", *files, "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "ablation.json").read_text())
    assert merged["summary"] == json.loads(json.dumps(both["summary"]))
    assert merged["paired"] == json.loads(json.dumps(both["paired"]))
    assert merged["meta"]["seed_list"] == [0, 1]
    with pytest.raises(ValueError, match="appears in two records"):
        ablation.merge_records([json.loads(open(files[0]).read())] * 2)


def test_run_arm_on_a_tiny_model(tmp_path):
    """The real path of one untrained and one trained arm: metrics, curve, per-query hits, probes."""
    base = make_config(model="tiny-random", image_size=32, synthetic_train_classes=8, synthetic_test_classes=30,
                       synthetic_images_per_class=2,
                       synthetic_test_images_per_class=2, classes_per_batch=4, images_per_class=2, embedding_size=16,
                       max_steps=2, eval_every=1, progress=False, max_new_tokens=4)
    untrained = ablation.run_arm(ablation.arm_config(base, "untrained", 0, tmp_path), "untrained", readout_pairs=4)
    dml = ablation.run_arm(ablation.arm_config(base, "dml", 0, tmp_path), "dml", readout_pairs=4)
    for out in (untrained, dml):
        assert len(out["hits"]) == 60 and out["R@1"] == pytest.approx(np.mean(out["hits"]))
        assert len(out["probe_embedding"]) == len(out["probe_tower_mean"]) == 6
        assert len(out["verdict_right"]) == len(out["attributes_right"]) == 4 and "readout/verdict/same" in out
    assert [step for step, _ in dml["curve"]] == [0, 1, 2] and dml["curve"][0][1] == pytest.approx(untrained["R@1"])


def test_cli_rejects_bad_overrides(capsys):
    assert ablation.parse_value("200") == 200 and ablation.parse_value("true") is True
    assert ablation.parse_value("tiny-random") == "tiny-random"
    assert ablation.main(["--set", "max_steps"]) == 2
    assert ablation.main(["--set", "no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_plot_run(tmp_path):
    records = [{"eval": "before", "step": 0, "R@1": 0.4}]
    records += [{"step": s, "completions": 8, "rewarded": s % 9, "loss_dml": 10.0 - s, "loss_kl": 0.5,
                 "groups_kept": int(s % 9 not in (0, 8))} for s in range(1, 13)]
    records += [{"eval": "epoch 0", "step": 12, "R@1": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    curves = plot.read_curves(tmp_path / "metrics.jsonl", window=10)
    assert curves["eval_steps"] == [0, 12] and curves["r_at_1"] == [0.4, 0.6]
    assert curves["reward"][0] == 1 / 8
    assert curves["reward_mean"][-1] == pytest.approx(sum(s % 9 for s in range(3, 13)) / 80)
    assert set(curves["losses"]) == {"loss_dml", "loss_kl"}  # L_GRPO off in this run: no curve
    assert curves["losses"]["loss_dml"]["steps"] == list(range(1, 13))
    assert curves["losses"]["loss_kl"]["steps"] == [s for s in range(1, 13) if s not in (8, 9)]  # nothing replayed
    assert curves["losses"]["loss_dml"]["mean"][-1] == pytest.approx(sum(10.0 - s for s in range(3, 13)) / 10)
    assert curves["logged"] == ["loss_dml", "loss_kl"]
    out = plot.plot_run(tmp_path)
    assert out == tmp_path / "training.png"
    with Image.open(out) as image:
        assert image.size[0] > 100 and image.size[1] > 100
    assert plot.main([str(tmp_path / "missing")]) == 2


def test_plot_skips_a_killed_runs_last_line_and_names_a_bad_one(tmp_path, capsys):
    good = [{"eval": "before", "step": 0, "R@1": 0.4}, {"step": 1, "loss_dml": 2.0}, {"step": 2, "loss_dml": 1.5}]
    text = "\n".join(json.dumps(r) for r in good)
    (tmp_path / "metrics.jsonl").write_text(text + '\n{"step": 3, "loss_d')  # killed while writing step 3
    curves = plot.read_curves(tmp_path / "metrics.jsonl")
    assert curves["losses"]["loss_dml"]["steps"] == [1, 2] and "incomplete last line" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss_d\n' + text + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:1 is not a JSON record"):
        plot.read_curves(tmp_path / "metrics.jsonl")
    assert plot.main([str(tmp_path)]) == 2


def test_merge_names_a_file_that_is_not_an_ablation_record(tmp_path, capsys):
    (tmp_path / "a.json").write_text('{"hello": 1}')
    (tmp_path / "b.json").write_text("not json")
    for name in ("a.json", "b.json"):
        assert ablation.main(["--merge", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2
        assert name in capsys.readouterr().err



# ------------------------------------------------------------------------------------------ mechanism
def test_mechanism_configs(tmp_path):
    base = make_config(**ablation.PAPER_REGIME)
    damage = mechanism.damage_config(base, 1, 100, tmp_path)
    assert (damage.lambda_lm, damage.lambda_kl, damage.lr_encoder, damage.max_steps) == (0.0, 0.0, 1e-3, 100)
    cfgs = {arm: mechanism.arm_config(base, arm, 1, 50, "dmg", tmp_path) for arm in mechanism.ARMS}
    assert all(c.init_embedder == "dmg" and c.max_steps == 50 and c.lr_encoder == 3e-4 for c in cfgs.values())
    for arm in ("verdict_random", "verdict_hard", "attributes_random", "attributes_hard", "shuffled"):
        assert (cfgs[arm].lambda_dml, cfgs[arm].lambda_kl, cfgs[arm].lambda_lm) == (0.0, 0.0, 1.0), arm
    assert cfgs["verdict_hard"].pair_sampling == "hard" and cfgs["attributes_random"].reward == "attributes"
    assert cfgs["shuffled"].shuffle_rewards and not cfgs["verdict_random"].shuffle_rewards
    assert (cfgs["dml_only"].lambda_dml, cfgs["dml_only"].lambda_lm) == (1.0, 0.0)
    with pytest.raises(ValueError, match="unknown arm"):
        mechanism.arm_config(base, "nope", 0, 1, "dmg", tmp_path)


def test_mechanism_end_to_end_on_a_tiny_world(tmp_path, signal):
    base = make_config(image_size=32, synthetic_train_classes=8, synthetic_test_classes=30,
                       synthetic_images_per_class=2, synthetic_test_images_per_class=2, classes_per_batch=4,
                       images_per_class=2, embedding_size=16, group_size=3, pairs_per_step=2, max_new_tokens=6,
                       progress=False)
    records = []
    for seed in (0, 1):
        records.append(mechanism.run_mechanism(base, [seed], ["verdict_hard", "shuffled", "dml_only"], damage_steps=2,
                                               steps=2, readout_pairs=4, run_root=tmp_path / "runs",
                                               out_dir=tmp_path / f"out{seed}", log=lambda *_: None))
    run = records[0]["runs"]["0"]
    assert set(run) == {"damaged", "verdict_hard", "shuffled", "dml_only"}
    assert len(run["shuffled"]["verdict_right"]) == 4 and len(run["dml_only"]["hits"]) == 60
    assert run["shuffled"]["rollouts"]["pairs_drawn"] >= 1 and "rollouts" not in run["dml_only"]
    d = records[0]["paired"]["verdict_hard - dml_only"]["0"]["R@1"]
    a, b = (np.array(run[arm]["hits"]) for arm in ("verdict_hard", "dml_only"))
    assert d["diff"] == pytest.approx((a - b).mean())
    assert set(records[0]["paired"]) == {"verdict_hard - damaged", "shuffled - damaged", "dml_only - damaged",
                                         "verdict_hard - dml_only", "verdict_hard - shuffled"}
    merged = mechanism.merge_records(records)
    assert merged["meta"]["seed_list"] == [0, 1] and merged["summary"]["shuffled"]["R@1"]["n"] == 2
    text = mechanism.markdown(merged)
    assert "| verdict_hard - shuffled | 1 |" in text and "| damaged |" in text
    files = [str(tmp_path / f"out{seed}" / "mechanism.json") for seed in (0, 1)]
    assert mechanism.main(["--merge", *files, "--out", str(tmp_path / "merged")]) == 0
    with pytest.raises(ValueError, match="appears in two records"):
        mechanism.merge_records([records[0], records[0]])


def test_mechanism_and_ablation_clis_name_what_is_wrong(tmp_path, capsys):
    good = {"meta": {"seed_list": [0], "base_config": {}, "arms": ["shuffled"], "steps": 1, "damage_steps": 1,
                     "readout_pairs": 2}, "runs": {"0": {"damaged": {"readout": {}, "verdict_right": [1], "hits": [1],
                                                                     "R@1": 1.0}}}}
    cases = {"list.json": "[]", "empty-object.json": "{}",
             "no-arm.json": json.dumps(good),
             "seed-name.json": json.dumps(dict(good, runs={"untrained": {}})),
             "no-settings.json": json.dumps({"meta": {"seed_list": [0]}, "runs": {}})}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        assert mechanism.main(["--merge", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and name in err and "Traceback" not in err, (name, err)
    assert mechanism.main(["--merge", str(tmp_path / "no-arm.json"), "--out", str(tmp_path / "o")]) == 2
    assert "seed 0 has no complete 'shuffled' run" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert mechanism.main(["--seeds", "0", "0"]) == 2 and "must not repeat" in capsys.readouterr().err
    assert mechanism.main(["--seeds", "0", "--out", str(tmp_path / "a-file")]) == 2
    assert "cannot be an output directory" in capsys.readouterr().err
    assert ablation.main(["--seeds", "0", "--run-root", str(tmp_path / "a-file" / "r")]) == 2
    assert "cannot be an output directory" in capsys.readouterr().err
    # a mechanism record is not an ablation record, and the other way round
    mech = {"meta": dict(good["meta"]), "runs": {}}
    (tmp_path / "mechanism.json").write_text(json.dumps(mech))
    assert ablation.main(["--merge", str(tmp_path / "mechanism.json"), "--out", str(tmp_path / "o")]) == 2
    assert "lacks note" in capsys.readouterr().err
    a = dict(mech, meta=dict(mech["meta"], steps=2))
    with pytest.raises(ValueError, match="different settings: steps$"):
        mechanism.merge_records([mech, a])
