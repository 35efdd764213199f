"""FSDP2 on two CPU processes (gloo): same losses as one process, exact resume from a sharded checkpoint,
consolidation to safetensors, the mixed text/image guarantee, validation / save_best, LoRA, and the faults
of one process: SIGTERM, SIGKILL mid-save of a checkpoint and of best/, a NaN loss, out of memory.

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
4. `torchrun`, 2 steps, rank 0 SIGKILLed while writing step 2's `best/`
   (`MMTUNE_FAULT_INJECT=kill_during_best_save@2`): step 1's `best/` stays whole.
5. Three `torchrun` runs where one process fails alone: rank 0 SIGKILLed while
   writing step 2's checkpoint, rank 1's loss NaN at step 3, rank 1 out of
   memory at step 2. Each must end (no hang) with what README promises.

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
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import free_port

from mmtune import runs
from mmtune.cli import main
from mmtune.config import RunConfig, load_config
from mmtune.data.collate import collate_examples
from mmtune.data.encode import tokenize_record
from mmtune.data.images import load_image
from mmtune.data.schema import read_records
from mmtune.data.templates import get_template
from mmtune.errors import MMTuneError
from mmtune.model import build_model
from mmtune.model.consolidate import consolidate
from mmtune.model.io import is_sharded, load_model, save_model
from mmtune.model.lora import apply_lora
from mmtune.train import checkpoint as ckpt
from mmtune.train.metrics import read_metrics
from mmtune.train.optim import build_optimizer, build_scheduler
from mmtune.train.param_groups import norm_parameter_names
from mmtune.train.precision import keep_trainable_fp32
from mmtune.train.sharding import load_sharded
from mmtune.train.validate import ValidationResult, ValidationSet

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "train"
CONFIG = REPO / "configs" / "tiny_mllm.yaml"
STEPS, BATCH = 4, 2


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _overrides(data: Path) -> list[str]:
    return [f"data.train=[{data}]", f"model.tokenizer.train_files=[{data}]", f"data.image_root={FIX}",
            f"train.batch_size={BATCH}", "train.save_every=2", "train.progress=false", "train.lr_schedule=cosine"]


def _eval_overrides(eval_file: Path) -> list[str]:
    return [f"data.eval=[{eval_file}]", "train.eval_every=2", "train.save_best=true"]


def _train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _eval_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]


def _run(cmd: list[str], fault: str = "") -> subprocess.CompletedProcess:
    """Run `cmd`; it must succeed, or with a `sigterm` fault, stop with exit code 143 (torchrun reports it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMTUNE_TRACE_BATCHES": "1", "MMTUNE_FAULT_INJECT": fault}
    try:
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as exc:  # a hang is one of the failures this test exists for
        pytest.fail(f"2-process FSDP training did not finish (hang?): {str(exc.stderr)[-2000:]}")
    if fault.startswith("sigterm"):
        assert proc.returncode != 0 and "exitcode  : 143" in proc.stderr, proc.stderr[-4000:]
    else:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _image_and_text_rows() -> tuple[list[str], list[str]]:
    image = [x for x in (FIX / "mixed.jsonl").read_text().splitlines() if json.loads(x)["images"]]
    return image, (FIX / "text.jsonl").read_text().splitlines()


def _alternating(tmp: Path) -> Path:
    """Image and text records line by line: rank 0 draws only image batches, rank 1 only text ones."""
    image, text = _image_and_text_rows()
    data = tmp / "alternating.jsonl"
    data.write_text("\n".join(x for pair in zip(image, text, strict=False) for x in pair) + "\n")
    return data


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    image, text = _image_and_text_rows()
    data = _alternating(tmp)
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
                 *_overrides(data), *_eval_overrides(evals[0])])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "mmtune.cli"]
    _run([*torchrun, "train", str(CONFIG), "--output-dir", str(resumed), "--max-steps", str(STEPS),
          "--resume-from", str(first / "checkpoint-2"), "train.distributed=fsdp", *_overrides(data),
          *_eval_overrides(evals[1])])
    return data, first, resumed, proc.stdout, evals


def test_fsdp_run_shards_and_keeps_text_only_ranks_image_free(fsdp_runs):
    _, out, _, stdout, _ = fsdp_runs
    assert "2 process(es) (FSDP2:" in stdout
    rank0, rank1 = _rows(out / "batches.jsonl"), _rows(out / "batches-rank1.jsonl")
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
    a = {r["step"]: r["loss"] for r in _train_rows(first)}
    b = {r["step"]: r["loss"] for r in _train_rows(resumed)}
    assert sorted(b) == [3, 4]
    assert [b[s] for s in (3, 4)] == pytest.approx([a[s] for s in (3, 4)], abs=1e-6, rel=0)
    for name in ("batches.jsonl", "batches-rank1.jsonl"):
        after = [(r["step"], r["ids"]) for r in _rows(first / name) if r["step"] > 2]
        assert [(r["step"], r["ids"]) for r in _rows(resumed / name)] == after


def _reference(data: Path, first: Path, extra: tuple[str, ...] = ()) -> tuple[list[float], Any]:
    """One process, the same global batch per step (both ranks' traced batches), same recipe."""
    from accelerate.utils import set_seed

    cfg = load_config(CONFIG, overrides=[*_overrides(data), *extra])
    set_seed(cfg.train.seed)
    bundle = build_model(cfg.model)
    if cfg.train.lora.enabled:  # as the trainer does: LoRA right after building, same RNG draws
        apply_lora(bundle.model, cfg.train.lora)
    opt, sched = _recipe(bundle.model, cfg)
    traced = len(_rows(first / "batches.jsonl"))  # every step the run took (fewer when it was stopped)
    return _replay(bundle, cfg, opt, sched, data, first, range(traced)), bundle


def _recipe(model: torch.nn.Module, cfg: RunConfig) -> tuple[Any, Any]:
    model.set_trainable("instruct")
    keep_trainable_fp32(model)
    model.train()
    opt = build_optimizer(model.named_parameters(), cfg.train, norm_parameter_names(model))
    return opt, build_scheduler(opt, cfg.train, STEPS)


def _replay(bundle: Any, cfg: RunConfig, opt: Any, sched: Any, data: Path, first: Path, steps: range) -> list[float]:
    model = bundle.model
    params = [p for p in model.parameters() if p.requires_grad]
    records = {r.id: r for r in read_records(data)}
    tmpl = get_template(cfg.data.template)
    traces = [_rows(first / "batches.jsonl"), _rows(first / "batches-rank1.jsonl")]
    losses = []
    for step in steps:
        step_losses = []
        for trace in traces:
            recs = [records[i] for i in trace[step]["ids"]]
            exs = [tokenize_record(r, bundle.tokenizer, tmpl, max_length=cfg.data.max_length,
                                   num_image_tokens=bundle.num_image_tokens) for r in recs]
            pix = [bundle.image_transform(load_image(FIX / p)) for r in recs for p in r.images]
            batch = collate_examples(exs, bundle.tokenizer.pad_token_id, pixel_values=pix or None)
            loss = model(**{k: batch.get(k) for k in ("input_ids", "attention_mask", "labels", "pixel_values")}).loss
            (loss / len(traces)).backward()  # FSDP averages the two ranks' gradients
            step_losses.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(sum(step_losses) / len(step_losses))
    return losses


def test_fsdp_losses_and_consolidated_weights_match_one_process(fsdp_runs, tmp_path):
    data, first, _, _, _ = fsdp_runs
    ref_losses, ref = _reference(data, first)
    ref_state = {k: v.detach().clone() for k, v in ref.model.state_dict().items()}
    fsdp_losses = [r["loss"] for r in _train_rows(first)]
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


def _one_process_eval(checkpoint: Path, eval_file: Path) -> ValidationResult:
    cfg = load_config(checkpoint / "run_config.yaml", RunConfig)
    cfg.data.eval = [str(eval_file)]
    bundle = load_model(checkpoint)  # the sharded weights, consolidated in memory
    return ValidationSet(cfg, bundle, rank=0, world_size=1).evaluate(bundle.model, "cpu", lambda t: t)


def test_fsdp_validation_loss_equals_one_process_and_best_is_a_sharded_model(fsdp_runs, tmp_path):
    _, first, resumed, _, evals = fsdp_runs
    rows = _eval_rows(first)
    assert [r["step"] for r in rows] == [2, 4] and all(r["eval_examples"] == 5 for r in rows)
    for row in rows:  # ranks held 2 and 1 batches: the padding forward is not counted
        one = _one_process_eval(first / f"checkpoint-{row['step']}", evals[0])
        assert one.examples == 5 and one.tokens == row["eval_tokens"]
        assert row["eval_loss"] == pytest.approx(one.loss, abs=1e-4, rel=0)
    # the resumed run: rank 1 held no eval record at all (filler forwards), still no hang and the same loss
    [row] = _eval_rows(resumed)
    one = _one_process_eval(resumed / "checkpoint-4", evals[1])
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


def test_fsdp_kill_during_best_save_keeps_previous_best_whole(tmp_path):
    """Rank 0 SIGKILLed half way through writing step 2's sharded best/ (its shard and model files written,
    best.json not): the run stops without a hang, best/ is still step 1's, whole and loadable, and
    what the next run clears first (`remove_stale_temps`) removes the half-written DIR/.tmp-best."""
    data, out = _alternating(tmp_path), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMTUNE_FAULT_INJECT": "kill_during_best_save@2"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mmtune.cli",
           "train", str(CONFIG), "--output-dir", str(out), "--max-steps", "2", "train.distributed=fsdp",
           *_overrides(data), f"data.eval=[{data}]", "train.eval_every=1", "train.eval_samples=4",
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
    [row] = [r for r in _eval_rows(out) if r["step"] == 1]  # whole: it still gives step 1's validation loss
    assert _one_process_eval(out / "best", data).loss == pytest.approx(row["eval_loss"], abs=1e-4, rel=0)
    assert ckpt.remove_stale_temps(out) == [half]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- #
# One process fails alone: the other must not wait for it
# --------------------------------------------------------------------------- #


def _failing_run(tmp: Path, fault: str, steps: int) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """torchrun, FSDP, a checkpoint every step, `fault` injected; the run must fail, and not hang."""
    data, out = _alternating(tmp), tmp / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMTUNE_TRACE_BATCHES": "1", "MMTUNE_FAULT_INJECT": fault}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mmtune.cli",
           "train", str(CONFIG), "--output-dir", str(out), "--max-steps", str(steps), "train.distributed=fsdp",
           *_overrides(data), "train.save_every=1"]
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
    at that step, before its optimizer step and save, and say which checkpoint to resume from."""
    _, out, proc = _failing_run(tmp_path, "nan@3:1", steps=3)
    lines = _error_lines(proc.stderr)
    last_good = f"Last good checkpoint: {out / 'checkpoint-2'}"
    assert any(x.startswith("mmtune train: error: [rank 1] loss is NaN/inf at step 3 on batch ids") and last_good in x
               for x in lines), proc.stderr[-3000:]
    assert any(x.startswith("mmtune train: error: [rank 0] loss is NaN/inf at step 3 on another process")
               and last_good in x for x in lines), proc.stderr[-3000:]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2] and not list(out.glob(".tmp-*"))
    assert [r["step"] for r in _train_rows(out)] == [1, 2]


def test_fsdp_out_of_memory_on_one_process_ends_the_run_without_a_hang(tmp_path):
    """Rank 1 runs out of memory in step 2's forward while rank 0 waits in that forward's all-gather. Rank 1
    names the batch and the settings to lower, and exits without the closing barrier rank 0 can never reach;
    the launcher then stops rank 0. (Before, rank 1 waited in that barrier and the run hung.) Only a
    one-process run saves the last step after an OOM: here checkpoint-1 is the last one."""
    _, out, proc = _failing_run(tmp_path, "oom@2:1", steps=3)
    [line] = _error_lines(proc.stderr)
    assert line.startswith("mmtune train: error: [rank 1] out of memory at step 2 on batch ids"), line
    assert "lower train.batch_size" in line and f"last checkpoint: {out / 'checkpoint-1'}" in line
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1] and not list(out.glob(".tmp-*"))


def test_fsdp_kill_during_checkpoint_save_keeps_the_previous_checkpoint_whole(tmp_path):
    """Rank 0 SIGKILLed half way through writing step 2's sharded checkpoint: rank 1, waiting for it in the
    save handshake, stops without a hang; checkpoint-1 is the one `--resume-from latest` takes and holds step
    1's weights (a one-process replay of step 1, to 1e-4); the next run removes the half-written folder."""
    data, out, _ = _failing_run(tmp_path, "kill_during_save@2:0", steps=3)
    half = out / ".tmp-checkpoint-2"
    assert (half / "sharded" / "__1_0.distcp").is_file() and not (out / "checkpoint-2").exists()
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]
    from accelerate.utils import set_seed

    cfg = load_config(CONFIG, overrides=_overrides(data))
    set_seed(cfg.train.seed)
    ref = build_model(cfg.model)
    opt, sched = _recipe(ref.model, cfg)
    _replay(ref, cfg, opt, sched, data, out, range(1))
    kept = load_model(out / "checkpoint-1").model.state_dict()  # the shards, consolidated in memory
    want = ref.model.state_dict()
    assert set(kept) == set(want)
    assert max(float((kept[k].float() - want[k].float()).abs().max()) for k in want) < 1e-4
    assert ckpt.remove_stale_temps(out) == [half]


# --------------------------------------------------------------------------- #
# LoRA under FSDP: the frozen base sharded, the adapter trained
# --------------------------------------------------------------------------- #

LORA = ("train.lora.enabled=true", "train.lora.dropout=0")  # no dropout: the replay draws no random numbers
STOP = 3  # the LoRA run is also the stop-on-request run: SIGTERM to rank 1 alone after this step


@pytest.fixture(scope="module")
def fsdp_lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_lora")
    data, out = _alternating(tmp), tmp / "run"
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "mmtune.cli", "train", str(CONFIG), "--output-dir", str(out), "--max-steps", str(STEPS),
                 "train.distributed=fsdp", *_overrides(data), *LORA], fault=f"sigterm@{STOP}:1")
    return data, out, proc.stdout


def test_fsdp_sigterm_to_one_process_stops_both_after_a_sharded_save(fsdp_lora_run):
    """SIGTERM to rank 1 alone: both processes finish the step, write its sharded checkpoint together
    and exit 143 (the stop request is reduced across processes with the step's loss); the next test
    checks that checkpoint's weights against a one-process replay."""
    _, out, _ = fsdp_lora_run
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, STOP]
    state = ckpt.read_trainer_state(out / f"checkpoint-{STOP}")
    assert state["sharded"] is True and state["step"] == STOP and state["world_size"] == 2
    steps = [[r["step"] for r in _rows(out / name)] for name in ("batches.jsonl", "batches-rank1.jsonl")]
    assert steps == [list(range(1, STOP + 1))] * 2 and [r["step"] for r in _train_rows(out)] == steps[0]
    assert not list(out.glob(".tmp-*"))


def test_fsdp_lora_losses_match_one_process_and_consolidate_like_an_unsharded_lora_run(fsdp_lora_run, tmp_path):
    data, out, stdout = fsdp_lora_run
    assert "LoRA" in stdout and "2 process(es) (FSDP2:" in stdout
    ref_losses, ref = _reference(data, out, LORA)
    assert len(ref_losses) == STOP
    assert [r["loss"] for r in _train_rows(out)] == pytest.approx(ref_losses, abs=1e-4, rel=0)
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
    cfg = load_config(CONFIG, overrides=[*_overrides(data), *LORA])
    bundle = load_model(out / "checkpoint-2", sharded_weights=False)
    assert bundle.model.has_lora
    opt, sched = _recipe(bundle.model, cfg)
    load_sharded(out / "checkpoint-2", bundle.model, opt)
    sched.load_state_dict(ckpt.load_state_file(out / "checkpoint-2" / runs.SCHEDULER_FILE))
    losses = _replay(bundle, cfg, opt, sched, data, out, range(2, STOP))
    assert losses == pytest.approx([r["loss"] for r in _train_rows(out)][2:], abs=1e-4, rel=0)
