"""The trainer's config: CLI flags generated from the dataclass, presets, JSON files, clear errors."""
import dataclasses
import json

import pytest

from saga_train.__main__ import main
from saga_train.config import PRESETS, Config, ConfigError, make_config, parse_args


def test_defaults_are_the_embedded_cpu_run():
    cfg = parse_args([])
    assert cfg == make_config(**PRESETS["default"]) and cfg.model == "synthetic-supervisor"  # the shipped supervisor
    assert (cfg.dml, cfg.epochs,
            cfg.synthetic_test_classes * cfg.synthetic_test_images_per_class) == ("supcon", 6, 1000)
    assert (PRESETS["paper"]["dml"] == "potential_field"
            and (PRESETS["paper"]["pf_alpha"], PRESETS["paper"]["pf_delta"]) == (4.0, 0.2))
    assert cfg.dataset == "synthetic" and cfg.device == "auto"
    assert Config().model == "tiny-random"  # Config() alone: a random tiny model (what the tests build)


def test_flags_are_generated_from_fields():
    cfg = parse_args(["--lambda-lm", "0", "--lambda-kl", "0.5", "--dml", "supcon", "--no-bf16", "--group-size", "3",
                      "--pooler", "mean"])
    assert cfg.lambda_lm == 0.0 and cfg.lambda_kl == 0.5 and cfg.dml == "supcon"
    assert cfg.bf16 is False and cfg.group_size == 3 and cfg.pooler == "mean"


def test_preset_then_file_then_cli(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"group_size": 5, "temperature": 0.9}))
    cfg = parse_args(["--preset", "paper", "--config", str(path), "--temperature", "0.3"])
    assert cfg.embedding_size == PRESETS["paper"]["embedding_size"] == 4096
    assert cfg.group_size == 5  # file beats preset
    assert cfg.temperature == 0.3  # CLI beats file
    assert cfg.kl_layer == 26 and cfg.max_new_tokens == 1024


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lambda_lm": 1.0, "lamda_kl": 2.0}))
    with pytest.raises(ConfigError, match="lamda_kl"):
        parse_args(["--config", str(path)])
    with pytest.raises(ConfigError, match="unknown config key.*bogus"):
        make_config(bogus=1)


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="dml='triplet'"):
        make_config(dml="triplet")
    with pytest.raises(ConfigError, match="group_size"):
        make_config(group_size=0)
    with pytest.raises(ConfigError, match="'epochs' needs a int"):
        make_config(epochs="3")
    with pytest.raises(ConfigError, match="lambda_kl must be >= 0"):
        make_config(lambda_kl=-1.0)


def test_cli_reports_errors_plainly(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text('{"nope": 1}')
    assert main(["--config", str(path)]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--no-such-flag", "1"])


def test_unknown_dataset_is_named(tmp_path, capsys):
    assert main(["--dataset", "imagenet", "--run-dir", str(tmp_path)]) == 2
    assert "imagenet" in capsys.readouterr().err


def test_non_qwen3vl_model_dir_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert main(["--model", str(tmp_path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "bert" in err and "Qwen3-VL" in err
    assert main(["--model", str(tmp_path / "missing"), "--run-dir", str(tmp_path / "run")]) == 2
    assert "missing" in capsys.readouterr().err


def test_supervisor_cache_error_is_reported_plainly(monkeypatch, capsys):
    import saga_train.__main__ as entry
    from saga_train.synthetic.store import SupervisorCacheError

    def refuse(cfg):
        raise SupervisorCacheError("refusing to overwrite /somewhere")

    monkeypatch.setattr(entry, "train", refuse)
    assert entry.main([]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_shard_llm_needs_torchrun(tmp_path, capsys):
    assert main(["--model", "tiny-random", "--shard-llm", "--image-size", "32", "--run-dir", str(tmp_path)]) == 2
    assert "--shard-llm" in capsys.readouterr().err


def test_help_shows_what_the_no_argument_run_uses():
    """``--help`` states, for every flag, what it means (the field's comment in config.py, the one source) and the
    value ``python -m saga_train`` with no arguments runs with."""
    from saga_train.config import Config, build_parser, field_comments

    cfg = parse_args([])
    actions = {a.dest: a for a in build_parser()._actions}
    meaning = field_comments(Config)
    assert meaning["lr_proxies"] == "100x the encoder lr (PF / PA papers)"
    assert meaning["model"].startswith("a local Qwen3-VL directory")
    for f in dataclasses.fields(cfg):
        assert actions[f.name].help.endswith(f"(default {getattr(cfg, f.name)})"), f.name
        if f.name in meaning:
            assert actions[f.name].help.startswith(meaning[f.name].replace("%", "%%")), f.name
    assert cfg.model == "synthetic-supervisor"
