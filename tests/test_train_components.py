"""mmtune.train components without a training run: checkpoints on disk, RNG, metrics, guards."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sys

import numpy as np
import pytest
import torch

from mmtune.config import DataConfig, TrainConfig
from mmtune.errors import MMTuneError
from mmtune.train import checkpoint as ckpt
from mmtune.train.guards import FaultInjector, StopSignal, describe_batch, oom_message
from mmtune.train.metrics import (
    BatchTrace,
    MetricsLogger,
    plot_loss_curve,
    read_metrics,
)
from mmtune.train.optim import build_optimizer, build_scheduler, resolve_mixed_precision


def _fake_checkpoint(out, step, payload="x"):
    # A plain-text payload: the integrity check (mmtune/integrity.py) would rightly call a text weights.bin corrupt.
    tmp = ckpt.begin_checkpoint(out, step)
    (tmp / "payload.txt").write_text(payload)
    return ckpt.commit_checkpoint(out, step, {"step": step})


# --------------------------------------------------------------------------- #
# Checkpoint folders
# --------------------------------------------------------------------------- #


def test_commit_is_atomic_and_latest_ignores_unfinished(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    # A save that died half way: temp folder with some files, no state file, never renamed.
    tmp = ckpt.begin_checkpoint(tmp_path, 4)
    (tmp / "payload.txt").write_text("half")
    # A checkpoint-like folder that is not one (no trainer_state.json).
    (tmp_path / "checkpoint-9").mkdir()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert ckpt.resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-2"
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    removed = ckpt.remove_stale_temps(tmp_path)
    assert removed == [tmp] and not tmp.exists()
    assert ckpt.step_of(tmp_path / "checkpoint-2") == 2


def test_resave_same_step_replaces_and_crash_between_renames_is_repaired(tmp_path):
    _fake_checkpoint(tmp_path, 3, "old")
    _fake_checkpoint(tmp_path, 3, "new")
    assert (tmp_path / "checkpoint-3" / "payload.txt").read_text() == "new"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    # Crash after moving the old copy aside but before the new one was renamed in.
    os.replace(tmp_path / "checkpoint-3", tmp_path / ".old-checkpoint-3")
    ckpt.remove_stale_temps(tmp_path)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"


def _fake_best(folder, step):
    folder.mkdir()
    (folder / "best.json").write_text(json.dumps({"step": step, "eval_loss": 1.0}))
    return folder


def test_stale_best_temps_are_removed_and_a_moved_aside_best_is_put_back(tmp_path):
    _fake_best(tmp_path / "best", 2)
    half = tmp_path / ".tmp-best"  # a best/ save killed half way
    half.mkdir()
    (half / "model_config.yaml").write_text("half")
    legacy = tmp_path / ".best.tmp-4242"  # the same, from mmtune before best/ had fixed temp names
    legacy.mkdir()
    _fake_best(tmp_path / ".old-best", 1)  # best/ already replaced: the aside copy is only left over
    removed = ckpt.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".best.tmp-4242", ".old-best", ".tmp-best"]
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 2
    # A crash between the two renames: best/ moved aside, the new one not yet in place.
    os.replace(tmp_path / "best", tmp_path / ".old-best")
    (tmp_path / ".tmp-best").mkdir()
    assert ckpt.remove_stale_temps(tmp_path) == [tmp_path / ".tmp-best"]
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 2
    # An aside folder that is not a whole best/ is not promoted to one.
    (tmp_path / "best").rename(tmp_path / "kept")
    (tmp_path / ".old-best").mkdir()
    assert ckpt.remove_stale_temps(tmp_path) == [tmp_path / ".old-best"] and not (tmp_path / "best").exists()


def _write(name, text="x"):
    return lambda tmp: (tmp / name).write_text(text)


def _fail(tmp):
    raise OSError("disk full")


def test_save_together_in_one_process_replaces_only_on_success(tmp_path):
    from mmtune.fileio import replace_dir
    from mmtune.train.handshake import ONE_PROCESS, save_together

    tmp, final = tmp_path / ".tmp-x", tmp_path / "x"
    commit = lambda t: replace_dir(t, final)
    save_together(tmp, final, ONE_PROCESS, write_each=_write("a", "1"), write_main=_write("b", "1"), commit=commit)
    assert sorted(p.name for p in final.iterdir()) == ["a", "b"] and not tmp.exists()
    tmp.mkdir()  # a stale temp folder of a crashed save is emptied first
    (tmp / "stale").write_text("")
    save_together(tmp, final, ONE_PROCESS, write_each=_write("a", "2"), write_main=_write("b", "2"), commit=commit)
    assert sorted(p.name for p in final.iterdir()) == ["a", "b"] and (final / "a").read_text() == "2"
    for each, main, com in ((_fail, _write("b"), commit), (_write("a", "3"), _fail, commit),
                            (_write("a", "3"), _write("b"), _fail)):
        with pytest.raises(OSError, match="disk full"):  # the error itself, not a wrapper
            save_together(tmp, final, ONE_PROCESS, write_each=each, write_main=main, commit=com)
        assert not tmp.exists() and (final / "a").read_text() == "2"


def test_save_together_across_processes_every_process_raises_and_nothing_is_committed(tmp_path):
    """Two processes (threads standing in for ranks): one's write fails, both raise, the old folder stays."""
    import threading

    from mmtune.fileio import replace_dir
    from mmtune.train.handshake import Processes, save_together

    barrier, flags = threading.Barrier(2), [None, None]

    def group(rank):
        def all_true(flag):
            flags[rank] = flag
            barrier.wait()
            agreed = all(flags)
            barrier.wait()
            return agreed
        return Processes(main=rank == 0, wait=barrier.wait, all_true=all_true)

    tmp, final = tmp_path / ".tmp-x", tmp_path / "x"
    final.mkdir()
    (final / "a").write_text("old")

    def run(fail_rank, fail_commit=False):
        results = [None, None]

        def worker(rank):
            each = _fail if rank == fail_rank else _write(f"shard{rank}")
            com = _fail if fail_commit else (lambda t: replace_dir(t, final))
            try:
                save_together(tmp, final, group(rank), write_each=each, write_main=_write("a", "new"), commit=com)
            except Exception as exc:  # noqa: BLE001 - each thread (rank) keeps what it raised, checked below
                results[rank] = exc
        threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert not any(t.is_alive() for t in threads), "a process was left waiting"
        return results

    for fail_rank in (0, 1):
        results = run(fail_rank)
        assert isinstance(results[fail_rank], OSError)  # its own error
        other = results[1 - fail_rank]
        assert isinstance(other, ckpt.CheckpointError) and "another process failed to write" in str(other)
        assert not tmp.exists() and sorted(p.name for p in final.iterdir()) == ["a"]
    results = run(None, fail_commit=True)  # the commit fails on the main process: the other one learns it too
    assert isinstance(results[0], OSError) and "failed to put it in place" in str(results[1])
    assert (final / "a").read_text() == "old" and not tmp.exists()
    assert run(None) == [None, None]
    assert sorted(p.name for p in final.iterdir()) == ["a", "shard0", "shard1"] and (final / "a").read_text() == "new"


def test_rotation_keeps_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    removed = ckpt.rotate_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-1", "checkpoint-2"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert ckpt.rotate_checkpoints(tmp_path, keep=0) == []  # 0 = keep everything


def test_resolve_resume_cases(tmp_path):
    assert ckpt.resolve_resume(None, tmp_path) is None
    assert ckpt.resolve_resume("latest", tmp_path / "nothing-yet") is None  # fresh start
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.resolve_resume(str(tmp_path / "missing"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "empty"), tmp_path)


def test_state_files_are_weights_only(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3, 3)
    opt.step()
    ckpt.save_state_file(opt.state_dict(), tmp_path / "optimizer.pt")
    loaded = ckpt.load_state_file(tmp_path / "optimizer.pt")
    assert torch.equal(loaded["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        ckpt.load_state_file(tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.load_state_file(tmp_path / "nope.pt")


def test_rng_state_roundtrip_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian behind in the legacy state
    ckpt.save_state_file(ckpt.capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.randn()), torch.rand(2).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.restore_rng_state(ckpt.load_state_file(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.randn()), torch.rand(2).tolist()) == expected
    assert ckpt.rng_file(0) == "rng.pt" and ckpt.rng_file(2) == "rng-rank2.pt"


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #


def test_metrics_resume_drops_steps_after_checkpoint_and_plots(tmp_path):
    m = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        m.log({"step": step, "loss": 5.0 - step * 0.5, "skips": {"a": 1}})
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "lo')  # torn line from a crash
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    m = MetricsLogger(tmp_path, resume_step=3, tensorboard=False)
    m.log({"step": 4, "loss": 9.0})
    m.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 4.5), (2, 4.0), (3, 3.5), (4, 9.0)]
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png is not None and (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A fresh run (no resume) starts a new file.
    MetricsLogger(tmp_path, tensorboard=False).close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []
    assert plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "none.png") is None


def test_batch_trace_off_by_default_and_truncates_on_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("MMTUNE_TRACE_BATCHES", raising=False)
    t = BatchTrace(tmp_path, 0)
    t.log(1, 0, {"ids": ["a"], "num_images": [0]})
    t.close()
    assert not (tmp_path / "batches.jsonl").exists()
    t = BatchTrace(tmp_path, 1, enabled=True)
    for step in (1, 2, 3):
        t.log(step, 0, {"ids": [f"r{step}"], "num_images": [1]})
    t.close()
    t = BatchTrace(tmp_path, 1, enabled=True, resume_step=2)
    t.close()
    rows = [json.loads(x) for x in (tmp_path / "batches-rank1.jsonl").read_text().splitlines()]
    assert [r["ids"] for r in rows] == [["r1"], ["r2"]]


# --------------------------------------------------------------------------- #
# Optimizer, schedule, precision
# --------------------------------------------------------------------------- #


def test_optimizer_groups_and_cosine_schedule():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    cfg = TrainConfig(lr=1.0, weight_decay=0.1, warmup_ratio=0.2, lr_schedule="cosine")
    opt = build_optimizer(model.named_parameters(), cfg)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and len(decay["params"]) == 1  # the trainable matrix only
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4  # biases + norm gain/bias
    sched = build_scheduler(opt, cfg, total_steps=10)  # 2 warmup steps
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:])) and lrs[-1] < 0.05
    const = build_scheduler(opt, TrainConfig(lr_schedule="constant", warmup_ratio=0.0), total_steps=10)
    assert const.get_last_lr()[0] == pytest.approx(opt.param_groups[0]["initial_lr"])
    with pytest.raises(MMTuneError, match="lr_schedule"):
        build_scheduler(opt, TrainConfig(lr_schedule="linearr"), total_steps=10)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(MMTuneError, match="nothing to train"):
        build_optimizer(frozen.named_parameters(), cfg)


def test_mixed_precision_resolution():
    expected_auto = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    assert resolve_mixed_precision("auto") == expected_auto
    assert resolve_mixed_precision("no") == "no"
    assert resolve_mixed_precision("bf16") == "bf16"
    with pytest.raises(MMTuneError, match="mixed_precision"):
        resolve_mixed_precision("fp8")
    if not torch.cuda.is_available():
        with pytest.raises(MMTuneError, match="fp16 needs a CUDA GPU"):
            resolve_mixed_precision("fp16")


# --------------------------------------------------------------------------- #
# Guards: signals, fault hooks, messages
# --------------------------------------------------------------------------- #


def test_stop_signal_turns_sigterm_into_a_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_fault_injector_parsing():
    f = FaultInjector("oom@3, nan@4,sigterm@2:1", rank=0)
    assert f.at("oom", 3) and f.at("nan", 4) and not f.at("sigterm", 2)  # that one is for rank 1
    assert FaultInjector("sigterm@2:1", rank=1).at("sigterm", 2)
    assert not FaultInjector("", rank=0)
    with pytest.raises(torch.OutOfMemoryError):
        f.maybe_oom(3)
    f.maybe_oom(2)
    assert torch.isnan(f.maybe_nan(4, torch.tensor(1.0)))
    assert FaultInjector("kill_during_best_save@4").at("kill_during_best_save", 4)
    f.maybe_kill("kill_during_best_save", 4)  # not injected here: nothing happens
    with pytest.raises(ValueError, match="not a kill fault"):
        f.maybe_kill("oom", 3)
    with pytest.raises(MMTuneError, match="unknown fault"):
        FaultInjector("explode@1")
    with pytest.raises(MMTuneError, match="cannot parse"):
        FaultInjector("oom")


def test_oom_message_names_batch_and_knobs():
    batch = {
        "input_ids": torch.zeros(2, 7, dtype=torch.long),
        "attention_mask": torch.tensor([[1] * 7, [1] * 3 + [0] * 4]),
        "ids": ["rec-a", "rec-b"],
        "num_images": [1, 0],
    }
    assert describe_batch(batch) == "ids ['rec-a', 'rec-b'] (row lengths [7, 3], padded to 7 tokens, 1 image(s))"
    msg = oom_message(5, 2, 4, batch, TrainConfig(batch_size=2), DataConfig(max_length=64))
    for part in ("step 5 (micro-batch 2/4)", "rec-a", "train.batch_size (now 2", "train.grad_accum",
                 "data.max_length (now 64)", "train.gradient_checkpointing=true"):
        assert part in msg


def test_metrics_go_to_tensorboard_when_it_is_installed(tmp_path, monkeypatch):
    import types

    calls = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is optional)
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    m = MetricsLogger(tmp_path, resume_step=None)
    assert m.tensorboard
    m.log({"step": 3, "loss": 1.5, "ids": "x", "skips": {"no_trainable_tokens": 2}, "flag": True})
    m.close()
    assert calls[0] == ("init", str(tmp_path / "tb"), None)
    assert ("train/loss", 1.5, 3) in calls and ("train/skips/no_trainable_tokens", 2, 3) in calls
    assert not any(c[0] in ("train/ids", "train/flag") for c in calls) and calls[-1] == ("close",)
