"""FSDP2 on two CPU processes (gloo) when one process fails alone: the other must not wait for it.

Each test is one `torchrun` run of the tiny MLLM (`train.distributed=fsdp`, the alternating image/text
data of test_train_fsdp.py) with one fault injected (`MMTUNE_FAULT_INJECT`) into one process:

- rank 0 SIGKILLed half way through writing step 2's `best/`, or step 2's checkpoint: the previous one
  stays whole and rank 1 stops without a hang;
- rank 1's loss NaN at step 3: both processes stop at that step and name the last good checkpoint;
- rank 1 out of memory at step 2: it names the batch and exits, the launcher stops rank 0 (this hung
  before: the failing process waited in a closing barrier the other never reached).

A hang fails the test at the subprocess timeout instead of stalling the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsdp_common as fc
import pytest
from fsdp_common import CONFIG, REPO
from helpers import cpu_launch_env

from mmtune import runs
from mmtune.model.io import load_model
from mmtune.train import checkpoint as ckpt


def test_fsdp_kill_during_best_save_keeps_previous_best_whole(tmp_path):
    """Rank 0 SIGKILLed half way through writing step 2's sharded best/ (its shard and model files written,
    best.json not): the run stops without a hang, best/ is still step 1's, whole and loadable, and
    what the next run clears first (`remove_stale_temps`) removes the half-written DIR/.tmp-best."""
    data, out = fc.alternating(tmp_path), tmp_path / "run"
    env = cpu_launch_env(MMTUNE_FAULT_INJECT="kill_during_best_save@2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mmtune.cli",
           "train", str(CONFIG), "--output-dir", str(out), "--max-steps", "2", "train.distributed=fsdp",
           *fc.overrides(data), f"data.eval=[{data}]", "train.eval_every=1", "train.eval_samples=4",
           "train.save_best=true", "train.save_every=0", "train.lr=3e-3"]
    try:
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"rank 1 hung after rank 0 was killed mid-save: {str(exc.stderr)[-2000:]}")
    assert proc.returncode != 0, proc.stderr[-2000:]
    half = out / runs.TMP_BEST
    assert (half / "sharded" / "__1_0.distcp").is_file() and not (half / runs.BEST_FILE).exists(), proc.stderr[-2000:]
    assert json.loads((out / "best" / runs.BEST_FILE).read_text())["step"] == 1
    assert sorted(p.name for p in (out / "best" / "sharded").iterdir()) == [".metadata", "__0_0.distcp",
                                                                            "__1_0.distcp"]
    [row] = [r for r in fc.eval_rows(out) if r["step"] == 1]  # whole: it still gives step 1's validation loss
    assert fc.one_process_eval(out / "best", data).loss == pytest.approx(row["eval_loss"], abs=1e-4, rel=0)
    assert ckpt.remove_stale_temps(out) == [half]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]




NO_WARMUP = "train.warmup_ratio=0"  # step 1 updates the weights too (with warmup its lr is 0)


def _failing_run(tmp: Path, fault: str, steps: int, *extra: str) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """torchrun, FSDP, a checkpoint every step, `fault` injected; the run must fail, and not hang."""
    data, out = fc.alternating(tmp), tmp / "run"
    env = cpu_launch_env(MMTUNE_TRACE_BATCHES="1", MMTUNE_FAULT_INJECT=fault)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mmtune.cli",
           "train", str(CONFIG), "--output-dir", str(out), "--max-steps", str(steps), "train.distributed=fsdp",
           *fc.overrides(data), "train.save_every=1", NO_WARMUP, *extra]
    try:  # a healthy run takes ~20 s; before the fix an OOM on one process waited for the other forever
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{fault}: the run hung instead of stopping: {str(exc.stderr)[-2000:]}")
    assert proc.returncode != 0, proc.stderr[-2000:]
    return data, out, proc


def _error_lines(stderr: str) -> list[str]:
    lines = [x for x in stderr.splitlines() if "mmtune train: error:" in x]
    assert all(x.count("mmtune train: error:") == 1 for x in lines), lines  # one whole line per process
    return lines


def test_fsdp_nan_on_one_process_stops_both_naming_the_last_good_checkpoint(tmp_path):
    """Only rank 1's loss is NaN at step 3: the count is reduced with the step's loss, so both processes stop
    at that step, before its optimizer step and save, and say which checkpoint to resume from.
    The run accumulates 2 micro-batches per step (as the 7B recipe does on 4 GPUs): steps 1-2 log the
    losses of a one-process replay of all four micro-batches of each step, to 1e-4."""
    data, out, proc = _failing_run(tmp_path, "nan@3:1", 3, "train.grad_accum=2")
    lines = _error_lines(proc.stderr)
    last_good = f"Last good checkpoint: {out / 'checkpoint-2'}"
    assert any(x.startswith("mmtune train: error: [rank 1] loss is NaN/inf at step 3 on batch ids") and last_good in x
               for x in lines), proc.stderr[-3000:]
    assert any(x.startswith("mmtune train: error: [rank 0] loss is NaN/inf at step 3 on another process")
               and last_good in x for x in lines), proc.stderr[-3000:]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2] and not list(out.glob(".tmp-*"))
    logged = fc.train_rows(out)
    assert [r["step"] for r in logged] == [1, 2]
    assert [r["micro"] for r in fc.rows(out / "batches-rank1.jsonl")] == [0, 1] * 3
    replayed, _ = fc.reference(data, out, (NO_WARMUP, "train.grad_accum=2"), steps=2, total_steps=3)
    assert [r["loss"] for r in logged] == pytest.approx(replayed, abs=1e-4, rel=0)


def test_fsdp_out_of_memory_on_one_process_ends_the_run_without_a_hang(tmp_path):
    """Rank 1 runs out of memory in step 2's forward while rank 0 waits in that forward's all-gather. Rank 1
    names the batch and the settings to lower, and exits without the closing barrier rank 0 can never reach;
    the launcher then stops rank 0. (Before, rank 1 waited in that barrier and the run hung.) Only a
    one-process run saves the last step after an OOM: here checkpoint-1 is the last one."""
    _, out, proc = _failing_run(tmp_path, "oom@2:1", 3)
    [line] = _error_lines(proc.stderr)
    assert line.startswith("mmtune train: error: [rank 1] out of memory at step 2 on batch ids"), line
    assert "lower train.batch_size" in line and f"last checkpoint: {out / 'checkpoint-1'}" in line
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1] and not list(out.glob(".tmp-*"))


def test_fsdp_kill_during_checkpoint_save_keeps_the_previous_checkpoint_whole(tmp_path):
    """Rank 0 SIGKILLed half way through writing step 2's sharded checkpoint: rank 1, waiting for it in the
    save handshake, stops without a hang; checkpoint-1 is the one `--resume-from latest` takes and holds step
    1's weights (a one-process replay of step 1, to 1e-4); the next run removes the half-written folder.
    The run also checkpoints activations (what the 7B recipe does under FSDP: each decoder layer's forward
    runs again in backward, inside its unit's second all-gather); the replay does not, so the weights
    also show that this changes nothing but memory."""
    data, out, _ = _failing_run(tmp_path, "kill_during_save@2:0", 3, "train.gradient_checkpointing=true")
    half = out / ".tmp-checkpoint-2"
    assert (half / "sharded" / "__1_0.distcp").is_file() and not (out / "checkpoint-2").exists()
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]
    _, ref = fc.reference(data, out, (NO_WARMUP,), steps=1, total_steps=3)
    init = fc.seeded_model(data, (NO_WARMUP,))[1].model.state_dict()
    kept = load_model(out / "checkpoint-1").model.state_dict()  # the shards, consolidated in memory
    want = ref.model.state_dict()
    assert set(kept) == set(want)
    assert max(float((kept[k].float() - want[k].float()).abs().max()) for k in want) < 1e-4
    assert max(float((kept[k].float() - init[k].float()).abs().max()) for k in init) > 1e-4  # step 1 did update
    assert ckpt.remove_stale_temps(out) == [half]
