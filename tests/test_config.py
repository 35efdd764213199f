from pathlib import Path

import pytest

from mmtune.config import ConfigError, RunConfig, TrainConfig, apply_overrides, from_dict, load_config, save_config


def test_defaults_and_overrides(tmp_path: Path) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("train:\n  lr: 1e-3\n  lora:\n    enabled: true\nmodel:\n  mode: llm\n")
    cfg = load_config(cfg_path, RunConfig, ["train.lr=5e-4", "train.batch_size=2", "data.train=[a.jsonl, b.jsonl]"])
    assert cfg.train.lr == 5e-4 and cfg.train.batch_size == 2
    assert cfg.train.lora.enabled is True and cfg.model.mode == "llm"
    assert cfg.data.train == ["a.jsonl", "b.jsonl"]
    assert cfg.train.max_grad_norm == TrainConfig().max_grad_norm


def test_unknown_key_names_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lr_schedul'.*did you mean 'train.lr_schedule'"):
        load_config(None, RunConfig, ["train.lr_schedul=cosine"])
    with pytest.raises(ConfigError, match=r"'modle'.*did you mean 'model'"):
        from_dict(RunConfig, {"modle": {}})


def test_type_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"train.batch_size: expected an integer"):
        load_config(None, RunConfig, ["train.batch_size=two"])
    with pytest.raises(ConfigError, match=r"expected true/false"):
        load_config(None, RunConfig, ["train.lora.enabled=maybe"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(None, RunConfig, ["train.lr"])


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_yaml_uses_safe_load(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError):
        load_config(evil)


def test_save_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(None, RunConfig, ["train.lr=0.01", "model.vision.feature_layer=-1"])
    save_config(cfg, tmp_path / "run.yaml")
    again = load_config(tmp_path / "run.yaml")
    assert again == cfg


def test_apply_overrides_creates_nested() -> None:
    assert apply_overrides({}, ["a.b.c=3"]) == {"a": {"b": {"c": 3}}}
