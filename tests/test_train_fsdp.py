"""FSDP2 on two CPU processes (gloo): same losses as one process, exact resume from a sharded checkpoint,
consolidation to safetensors, the mixed text/image guarantee, validation / save_best, LoRA, and a stop
on SIGTERM to one process.

Runs the tiny MLLM through `mmtune train` under two processes:

1. `accelerate launch --use_fsdp` (FSDP chosen by the launcher's config, not
   the run config), 4 steps, sharded checkpoints at steps 2 and 4. The data
   alternates image and text records line by line, so rank 0 draws only image
   batches and rank 1 only text-only ones: under FSDP rank 1 runs the tower
   and projector on an empty image batch, so the run must finish (no hang)
   with no image ever given to rank 1. It validates at steps 2 and 4 on 5
   records (rank 0 holds 2 batches, rank 1 one) and keeps `best/`.
2. `torchrun` with `train.distributed=fsdp`, resumed from run 1's step-2
   sharded checkpoint: steps 3-4 must have run 1's losses and record ids. It
   validates on 1 record (rank 1 holds none).
3. `torchrun`, LoRA under FSDP (frozen base sharded, adapter trained), 4 steps asked, rank 1
   alone sent SIGTERM after step 3 (`MMTUNE_FAULT_INJECT=sigterm@3:1`): both processes save
   step 3's sharded checkpoint and exit 143.

The faults of one process (SIGKILL mid-save, NaN, out of memory) are in test_train_fsdp_faults.py.

The reference is a single process replaying the same global batches (both
ranks' batches of each step, as traced by `MMTUNE_TRACE_BATCHES`) on the same
seeded model with the same optimizer groups, schedule and clipping: its per
step losses must match the FSDP run's to 1e-4, and its final weights the
consolidated checkpoint's (`mmtune consolidate`), also to 1e-4.

What runs on CPU here and what does not: sharding, gradient reduce-scatter,
the DCP checkpoint and resume are the same code on gloo and NCCL;
bf16 mixed-precision all-gathers and the memory savings only show on GPUs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import fsdp_common as fc
import pytest
import torch
from fsdp_common import CONFIG, REPO, STEPS
from helpers import cpu_launch_env, free_port

from mmtune import runs
from mmtune.cli import main
from mmtune.config import load_config
from mmtune.errors import MMTuneError
from mmtune.model.consolidate import consolidate
from mmtune.model.io import is_sharded, load_model, save_model
from mmtune.train import checkpoint as ckpt
from mmtune.train.sharding import load_sharded


def _run(cmd: list[str], fault: str = "") -> subprocess.CompletedProcess:
    """Run `cmd`; it must succeed, or with a `sigterm` fault, stop with exit code 143 (torchrun reports it)."""
    env = cpu_launch_env(MMTUNE_TRACE_BATCHES="1", MMTUNE_FAULT_INJECT=fault)
    try:
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as exc:  # a hang is one of the failures this test exists for
        pytest.fail(f"2-process FSDP training did not finish (hang?): {str(exc.stderr)[-2000:]}")
    if fault.startswith("sigterm"):
        assert proc.returncode != 0 and "exitcode  : 143" in proc.stderr, proc.stderr[-4000:]
    else:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    image, text = fc.image_and_text_rows()
    data = fc.alternating(tmp)
    # Validation sets split by line: 5 records -> rank 0 holds 2 batches, rank 1 one (one padding forward);
    # 1 record -> rank 1 holds none (its forwards run a one-token filler batch, never counted).
    evals = tmp / "eval5.jsonl", tmp / "eval1.jsonl"
    evals[0].write_text("\n".join([*image[-3:], *text[-2:]]) + "\n")
    evals[1].write_text(image[-1] + "\n")
    first, resumed = tmp / "run", tmp / "resumed"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "mmtune.cli"]
    proc = _run([*launch, "train", str(CONFIG), "--output-dir", str(first), "--max-steps", str(STEPS),
                 *fc.overrides(data), *fc.eval_overrides(evals[0])])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "mmtune.cli"]
    _run([*torchrun, "train", str(CONFIG), "--output-dir", str(resumed), "--max-steps", str(STEPS),
          "--resume-from", str(first / "checkpoint-2"), "train.distributed=fsdp", *fc.overrides(data),
          *fc.eval_overrides(evals[1])])
    return data, first, resumed, proc, evals


def test_fsdp_run_shards_and_keeps_text_only_ranks_image_free(fsdp_runs):
    _, out, _, proc, _ = fsdp_runs
    assert "2 process(es) (FSDP2:" in proc.stdout
    # the projector's output is a fresh tensor, not a view FSDP2 warns about (its backward hook would be lost
    # to an in-place op on it)
    assert "returned a view tensor" not in proc.stderr, proc.stderr[-2000:]
    rank0, rank1 = fc.rows(out / "batches.jsonl"), fc.rows(out / "batches-rank1.jsonl")
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == list(range(1, STEPS + 1))
    assert all(n == 1 for r in rank0 for n in r["num_images"])  # images only on rank 0
    assert all(n == 0 for r in rank1 for n in r["num_images"])  # and no dummy image on rank 1
    state = ckpt.read_trainer_state(out / "checkpoint-4")
    assert state["sharded"] is True and state["world_size"] == 2
    shards = sorted(p.name for p in (out / "checkpoint-4" / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per process
    assert not (out / "checkpoint-4" / "optimizer.pt").exists() and is_sharded(out / "checkpoint-4")
    assert not list(out.glob(".tmp-*"))


def test_fsdp_resumes_exactly_from_a_sharded_checkpoint(fsdp_runs):
    _, first, resumed, _, _ = fsdp_runs
    a = {r["step"]: r["loss"] for r in fc.train_rows(first)}
    b = {r["step"]: r["loss"] for r in fc.train_rows(resumed)}
    assert sorted(b) == [3, 4]
    assert [b[s] for s in (3, 4)] == pytest.approx([a[s] for s in (3, 4)], abs=1e-6, rel=0)
    for name in ("batches.jsonl", "batches-rank1.jsonl"):
        after = [(r["step"], r["ids"]) for r in fc.rows(first / name) if r["step"] > 2]
        assert [(r["step"], r["ids"]) for r in fc.rows(resumed / name)] == after


def test_fsdp_losses_and_consolidated_weights_match_one_process(fsdp_runs, tmp_path):
    data, first, _, _, _ = fsdp_runs
    ref_losses, ref = fc.reference(data, first)
    ref_state = {k: v.detach().clone() for k, v in ref.model.state_dict().items()}
    fsdp_losses = [r["loss"] for r in fc.train_rows(first)]
    assert fsdp_losses == pytest.approx(ref_losses, abs=1e-4, rel=0)

    out = tmp_path / "consolidated"
    assert main(["consolidate", str(first), "--out", str(out)]) == 0  # the run folder -> its latest checkpoint
    assert (out / "lm" / "model.safetensors").is_file() and (out / "projector.safetensors").is_file()
    assert not (out / "sharded").exists() and not is_sharded(out)
    merged = load_model(out).model.state_dict()
    assert set(merged) == set(ref_state)
    worst = max(float((merged[k].float() - ref_state[k].float()).abs().max()) for k in ref_state)
    assert worst < 1e-4, worst
    with pytest.raises(MMTuneError, match="already exists"):
        consolidate(first, out)  # never overwrites


def test_fsdp_validation_loss_equals_one_process_and_best_is_a_sharded_model(fsdp_runs, tmp_path):
    _, first, resumed, _, evals = fsdp_runs
    rows = fc.eval_rows(first)
    assert [r["step"] for r in rows] == [2, 4] and all(r["eval_examples"] == 5 for r in rows)
    for row in rows:  # ranks held 2 and 1 batches: the padding forward is not counted
        one = fc.one_process_eval(first / f"checkpoint-{row['step']}", evals[0])
        assert one.examples == 5 and one.tokens == row["eval_tokens"]
        assert row["eval_loss"] == pytest.approx(one.loss, abs=1e-4, rel=0)
    # the resumed run: rank 1 held no eval record at all (filler forwards), still no hang and the same loss
    [row] = fc.eval_rows(resumed)
    one = fc.one_process_eval(resumed / "checkpoint-4", evals[1])
    assert row["step"] == 4 and row["eval_examples"] == one.examples == 1
    assert row["eval_loss"] == pytest.approx(one.loss, abs=1e-4, rel=0)
    assert json.loads((resumed / "best" / "best.json").read_text())["step"] == 4 and is_sharded(resumed / "best")
    # best/: the lowest validation loss, written sharded like a checkpoint, read as a model folder
    best = min(rows, key=lambda r: r["eval_loss"])
    info = json.loads((first / "best" / "best.json").read_text())
    assert info["step"] == best["step"] and info["eval_loss"] == pytest.approx(best["eval_loss"])
    assert is_sharded(first / "best") and (first / "best" / "run_config.yaml").is_file()
    assert sorted(p.name for p in (first / "best" / "sharded").iterdir()) == [".metadata", "__0_0.distcp",
                                                                              "__1_0.distcp"]
    assert not [p for p in first.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    a = load_model(first / "best").model.state_dict()
    b = load_model(first / f"checkpoint-{best['step']}").model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    out = tmp_path / "best-consolidated"
    assert main(["consolidate", str(first / "best"), "--out", str(out)]) == 0
    assert (out / "lm" / "model.safetensors").is_file() and not is_sharded(out)
    c = load_model(out).model.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------- #
# LoRA under FSDP: the frozen base sharded, the adapter trained
# --------------------------------------------------------------------------- #

LORA = ("train.lora.enabled=true", "train.lora.dropout=0")  # no dropout: the replay draws no random numbers
STOP = 3  # the LoRA run is also the stop-on-request run: SIGTERM to rank 1 alone after this step


@pytest.fixture(scope="module")
def fsdp_lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_lora")
    data, out = fc.alternating(tmp), tmp / "run"
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "mmtune.cli", "train", str(CONFIG), "--output-dir", str(out), "--max-steps", str(STEPS),
                 "train.distributed=fsdp", *fc.overrides(data), *LORA], fault=f"sigterm@{STOP}:1")
    return data, out, proc.stdout


def test_fsdp_sigterm_to_one_process_stops_both_after_a_sharded_save(fsdp_lora_run):
    """SIGTERM to rank 1 alone: both processes finish the step, write its sharded checkpoint together
    and exit 143 (the stop request is reduced across processes with the step's loss); the next test
    checks that checkpoint's weights against a one-process replay."""
    _, out, _ = fsdp_lora_run
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, STOP]
    state = ckpt.read_trainer_state(out / f"checkpoint-{STOP}")
    assert state["sharded"] is True and state["step"] == STOP and state["world_size"] == 2
    steps = [[r["step"] for r in fc.rows(out / name)] for name in ("batches.jsonl", "batches-rank1.jsonl")]
    assert steps == [list(range(1, STOP + 1))] * 2 and [r["step"] for r in fc.train_rows(out)] == steps[0]
    assert not list(out.glob(".tmp-*"))


def test_fsdp_lora_losses_match_one_process_and_consolidate_like_an_unsharded_lora_run(fsdp_lora_run, tmp_path):
    data, out, stdout = fsdp_lora_run
    assert "LoRA" in stdout and "2 process(es) (FSDP2:" in stdout
    ref_losses, ref = fc.reference(data, out, LORA)
    assert len(ref_losses) == STOP
    assert [r["loss"] for r in fc.train_rows(out)] == pytest.approx(ref_losses, abs=1e-4, rel=0)
    last = out / f"checkpoint-{STOP}"  # written on the stop request
    assert is_sharded(last) and (last / "adapter" / "adapter_config.json").is_file()
    assert not (last / "adapter" / "adapter_model.safetensors").exists()  # the adapter's weights are shards
    # consolidated = what an unsharded LoRA run stores (save_model of the same model in one process)
    merged = tmp_path / "consolidated"
    assert main(["consolidate", str(out), "--out", str(merged)]) == 0
    plain = tmp_path / "plain"
    plain.mkdir()
    save_model(ref, plain)
    files = sorted(str(p.relative_to(merged)) for p in merged.rglob("*") if p.is_file() and "tokenizer" not in p.parts)
    assert files == sorted([str(p.relative_to(plain)) for p in plain.rglob("*")
                            if p.is_file() and "tokenizer" not in p.parts] + ["run_config.yaml"])
    assert "adapter/adapter_model.safetensors" in files and "lm/model.safetensors" in files
    from safetensors.torch import load_file

    for name in ("adapter/adapter_model.safetensors", "lm/model.safetensors", "projector.safetensors"):
        a, b = load_file(str(merged / name)), load_file(str(plain / name))
        assert set(a) == set(b), name
        if name.startswith("adapter"):  # the adapter did train (lora_B starts at zero)
            assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 0
        worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        assert worst < 1e-4, (name, worst)
    # export merges the adapter, as for any LoRA checkpoint: the sharded one is read as is
    assert load_model(last).model.has_lora


def test_fsdp_lora_sharded_checkpoint_resumes_exactly(fsdp_lora_run):
    """checkpoint-2's shards (adapter + AdamW moments) and schedule continue to step 3's loss.

    The same calls the trainer's FSDP resume makes (`load_model` rebuilding the adapter from
    adapter_config.json, `set_trainable`, `load_sharded`), in one process (DCP reads any
    process count's shards).
    """
    data, out, _ = fsdp_lora_run
    cfg = load_config(CONFIG, overrides=[*fc.overrides(data), *LORA])
    bundle = load_model(out / "checkpoint-2", sharded_weights=False)
    assert bundle.model.has_lora
    opt, sched = fc.recipe(bundle.model, cfg)
    load_sharded(out / "checkpoint-2", bundle.model, opt)
    sched.load_state_dict(ckpt.load_state_file(out / "checkpoint-2" / runs.SCHEDULER_FILE))
    losses = fc.replay(bundle, cfg, opt, sched, data, out, range(2, STOP))
    assert losses == pytest.approx([r["loss"] for r in fc.train_rows(out)][2:], abs=1e-4, rel=0)
