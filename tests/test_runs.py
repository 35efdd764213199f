"""mmtune.runs: the run folder's one owner (layout, the two completeness rules, run_config)."""

from __future__ import annotations

import pytest

from mmtune import runs
from mmtune.config import RunConfig, load_config
from mmtune.eval.backends import fingerprint_model


def _model_folder(path, *, trained: bool = False):
    path.mkdir(parents=True)
    (path / runs.MODEL_CONFIG_FILE).write_text("mode: llm\n")
    (path / runs.PROJECTOR_FILE).write_bytes(b"weights")
    if trained:
        (path / runs.STATE_FILE).write_text("{}")
    return path


def test_model_folder_and_training_checkpoint_are_two_rules(tmp_path):
    run = tmp_path / "run"
    _model_folder(run / "checkpoint-2", trained=True)
    _model_folder(run / "checkpoint-10")  # a model folder, but no trainer_state.json: not resumable
    (run / "checkpoint-99").mkdir()  # neither
    (run / ".tmp-checkpoint-12").mkdir()

    assert runs.resolve_model_folder(run) == run / "checkpoint-10"  # numeric order, not text order
    assert runs.latest_model_folder(run) == run / "checkpoint-10"
    assert runs.resolve_checkpoint(run) == run / "checkpoint-2"
    assert runs.latest_checkpoint(run) == run / "checkpoint-2"
    assert runs.list_checkpoints(run) == [(2, run / "checkpoint-2")]
    assert runs.resolve_model_folder(run / "checkpoint-2") == run / "checkpoint-2"
    with pytest.raises(runs.CheckpointError, match="no trainer_state.json"):
        runs.resolve_checkpoint(run / "checkpoint-99")
    with pytest.raises(runs.CheckpointError, match="model_config.yaml missing"):
        runs.resolve_model_folder(run / "checkpoint-99")
    with pytest.raises(runs.CheckpointError, match="no such checkpoint"):
        runs.resolve_model_folder(tmp_path / "nowhere")
    assert runs.latest_checkpoint(tmp_path / "nowhere") is None


def test_checkpoint_file_list_covers_every_rank():
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng.pt", "rng-rank1.pt", "rng-rank17.pt",
                 "run_config.yaml"):
        assert runs.is_training_state_file(name), name
    for name in ("model_config.yaml", "projector.safetensors", "model.safetensors", "rng-rankx.pt"):
        assert not runs.is_training_state_file(name), name
    assert runs.rng_file(0) == "rng.pt" and runs.rng_file(3) == "rng-rank3.pt"
    assert runs.log_file(0) == "train.log" and runs.log_file(2) == "train-rank2.log"


def test_eval_fingerprint_ignores_every_ranks_training_state(tmp_path):
    # eval's old list knew rng.pt but not rng-rank{r}.pt: a 2-process checkpoint changed fingerprint.
    folder = _model_folder(tmp_path / "ckpt", trained=True)
    before = fingerprint_model(folder)
    (folder / "rng-rank1.pt").write_bytes(b"rng state")
    (folder / runs.OPTIMIZER_FILE).write_bytes(b"optimizer")
    assert fingerprint_model(folder) == before
    (folder / runs.PROJECTOR_FILE).write_bytes(b"other weights")
    assert fingerprint_model(folder) != before


def test_run_config_reader_prefers_the_checkpoints_own_copy(tmp_path):
    run = tmp_path / "run"
    ckpt = _model_folder(run / "checkpoint-1")
    assert runs.read_run_config(ckpt) is None and runs.trained_template(ckpt) is None
    cfg = load_config(None, RunConfig, ["data.template=chatml", "data.holdout_tasks=[a]"])
    runs.write_run_config(cfg, run)
    assert runs.run_config_path(ckpt) == run / runs.RUN_CONFIG_FILE
    assert runs.trained_template(ckpt) == "chatml"
    assert runs.run_config_value(ckpt, "data.holdout_tasks") == ["a"]
    assert runs.run_config_value(ckpt, "data.nothing.deeper") is None
    cfg.data.template = "vicuna_v1"
    runs.write_run_config(cfg, ckpt)
    assert runs.trained_template(ckpt) == "vicuna_v1"
    assert not list(run.glob(".*.tmp")) and not list(ckpt.glob(".*.tmp"))
