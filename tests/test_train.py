"""`mmtune train` end to end on CPU with the tiny configs: outputs, exact resume, guards.

Every run here is a few optimizer steps of a ~0.1M-parameter model. The
resume tests compare per-step losses and the record ids of every batch
(`MMTUNE_TRACE_BATCHES=1`) between an uninterrupted run and an interrupted
one; faults (SIGTERM, SIGKILL while saving, OOM, NaN) are provoked at a chosen
step with `MMTUNE_FAULT_INJECT`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtune.cli import main
from mmtune.config import RunConfig, load_config
from mmtune.fileio import write_json_atomic
from mmtune.train import checkpoint as ckpt
from mmtune.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "train"
TEXT = FIX / "text.jsonl"
MIXED = FIX / "mixed.jsonl"


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: threads only add contention on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def env(**values):
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = str(v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def llm_args(out, *extra, data=TEXT):
    return ["train", str(REPO / "configs" / "tiny_llm.yaml"), "--output-dir", str(out),
            f"data.train=[{data}]", f"model.tokenizer.train_files=[{TEXT}]",
            "train.batch_size=4", "train.progress=false", *extra]


def mllm_args(out, *extra, data=MIXED):
    return ["train", str(REPO / "configs" / "tiny_mllm.yaml"), "--output-dir", str(out),
            f"data.train=[{data}]", f"model.tokenizer.train_files=[{MIXED}]", f"data.image_root={FIX}",
            "train.batch_size=4", "train.progress=false", *extra]


def train(args, fault=None, trace=True):
    with env(MMTUNE_FAULT_INJECT=fault, MMTUNE_TRACE_BATCHES="1" if trace else None):
        return main(args)


def losses(out):
    return [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl")]


def steps(out):
    return [r["step"] for r in read_metrics(Path(out) / "metrics.jsonl")]


def batch_ids(out, rank=0):
    name = "batches.jsonl" if rank == 0 else f"batches-rank{rank}.jsonl"
    rows = [json.loads(x) for x in (Path(out) / name).read_text().splitlines()]
    return [(r["step"], r["micro"], tuple(r["ids"])) for r in rows]


def assert_same_run(a, b):
    assert steps(a) == steps(b)
    la, lb = losses(a), losses(b)
    assert la == pytest.approx(lb, abs=1e-6, rel=0)
    assert batch_ids(a) == batch_ids(b)


# Uninterrupted reference: tiny LLM, 6 steps, checkpoints every 2, keep 2.
LLM_BASE = ("--max-steps", "6", "train.save_every=2", "train.save_total_limit=2")


@pytest.fixture(scope="module")
def llm_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm_base")
    assert train(llm_args(out, *LLM_BASE)) == 0
    return out


# --------------------------------------------------------------------------- #
# A plain run
# --------------------------------------------------------------------------- #


def test_run_writes_config_metrics_checkpoints_and_plot(llm_base, capsys):
    out = llm_base
    cfg = load_config(out / "run_config.yaml", RunConfig)
    assert cfg.train.max_steps == 6 and cfg.train.output_dir == str(out) and cfg.train.batch_size == 4
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "padding_share", "skipped", "skips",
                "examples", "grad_norm"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and 0.0 <= r["padding_share"] < 1.0
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1e-3)  # 1 warmup step of 6, then cosine
    assert [r["examples"] for r in rows] == [4, 8, 12, 16, 20, 24]
    assert all(b["tokens"] > a["tokens"] for a, b in itertools.pairwise(rows))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # save_total_limit=2 rotated checkpoint-2 away.
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [4, 6]
    c6 = out / "checkpoint-6"
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "run_config.yaml",
                 "model_config.yaml", "tokenizer", "lm"):
        assert (c6 / name).exists(), name
    state = ckpt.read_trainer_state(c6)
    assert state["step"] == 6 and state["world_size"] == 1 and len(state["data_state"]) == 1
    assert "trainable" in (out / "train.log").read_text()
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())
    # The checkpoint is a model folder the rest of mmtune loads.
    from mmtune.model.io import load_model

    bundle = load_model(out)
    assert bundle.model.lm.config.hidden_size == 64


def test_trainable_parameters_printed_before_training(tmp_path, capsys):
    assert train(llm_args(tmp_path, "--max-steps", "1", "train.mixed_precision=bf16"), trace=False) == 0
    printed = capsys.readouterr().out
    assert "mixed precision bf16" in printed  # CPU autocast
    assert "stage instruct; trainable parameters:" in printed
    assert "lm" in printed and "100.00%" in printed and "total" in printed
    assert "done, step 1/1" in printed


def test_cli_mixes_flags_and_overrides_in_any_order(tmp_path):
    args = ["train", str(REPO / "configs" / "tiny_llm.yaml"), f"data.train=[{TEXT}]", "--max-steps", "2",
            f"model.tokenizer.train_files=[{TEXT}]", "--output-dir", str(tmp_path), "train.lr=5e-4",
            "train.progress=false", "train.batch_size=2"]
    assert main(args) == 0
    cfg = load_config(tmp_path / "run_config.yaml", RunConfig)
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.batch_size) == (2, 5e-4, 2)
    assert steps(tmp_path) == [1, 2]


def test_config_errors_are_one_line(tmp_path, capsys):
    assert main(llm_args(tmp_path, "train.lrr=1")) == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err
    assert main(llm_args(tmp_path, "train.stage=align")) == 2
    assert "model.mode is 'llm'" in capsys.readouterr().err
    assert main(llm_args(tmp_path, "train.lora.enabled=true", "train.stage=align")) == 2
    assert "stage instruct" in capsys.readouterr().err


def test_num_epochs_with_grad_accum_packing_and_checkpointing(tmp_path):
    from mmtune.data.batching import Batcher
    from mmtune.data.stream import ExampleStream
    from mmtune.model.io import load_model

    args = llm_args(tmp_path, "train.max_steps=-1", "train.num_epochs=1", "train.grad_accum=2",
                    "data.packing=true", "train.gradient_checkpointing=true", "train.batch_size=2")
    assert train(args) == 0
    bundle = load_model(tmp_path)
    counter = Batcher(ExampleStream([str(TEXT)], bundle.tokenizer, "vicuna_v1", max_length=256, epochs=1,
                                    shuffle_buffer=64, seed=0), batch_size=2, packing=True, seed=0)
    expected = sum(1 for _ in counter) // 2
    assert expected >= 1
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, expected + 1))
    assert all(math.isfinite(r["loss"]) for r in rows)
    trace = batch_ids(tmp_path)
    assert [(s, m) for s, m, _ in trace] == [(s, m) for s in range(1, expected + 1) for m in (0, 1)]
    assert ckpt.read_trainer_state(ckpt.latest_checkpoint(tmp_path))["total_steps"] == expected


# --------------------------------------------------------------------------- #
# Exact resume
# --------------------------------------------------------------------------- #


def test_kill_during_save_keeps_previous_checkpoint_and_resumes_exactly(llm_base, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmtune.cli", *llm_args(out, *LLM_BASE)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MMTUNE_FAULT_INJECT": "kill_during_save@4",
                               "MMTUNE_TRACE_BATCHES": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    half = out / ".tmp-checkpoint-4"
    assert half.is_dir() and any(half.iterdir()) and not (half / "trainer_state.json").exists()
    assert not (out / "checkpoint-4").exists()
    assert ckpt.latest_checkpoint(out) == out / "checkpoint-2"
    assert steps(out) == [1, 2, 3, 4]  # step 4 was logged before its save died
    # The previous checkpoint loads and the run continues exactly.
    assert train(llm_args(out, *LLM_BASE, "--resume-from", "latest")) == 0
    assert not half.exists()
    assert_same_run(out, llm_base)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [4, 6]


def test_lora_run_stopped_by_max_steps_resumes_exactly(tmp_path):
    lora = ("train.lora.enabled=true", "train.lora.dropout=0.2", "train.lora.r=4",
            "train.lr_schedule=constant", "train.warmup_ratio=0")
    base, cut = tmp_path / "base", tmp_path / "cut"
    assert train(llm_args(base, *lora, "--max-steps", "6")) == 0
    assert train(llm_args(cut, *lora, "--max-steps", "3")) == 0
    assert (cut / "checkpoint-3" / "adapter" / "adapter_model.safetensors").is_file()
    assert train(llm_args(cut, *lora, "--max-steps", "6", "--resume-from", "latest")) == 0
    assert_same_run(base, cut)
    # LoRA trained only the adapter: the base LM weights are unchanged from step 3 to 6.
    from safetensors.torch import load_file

    w3 = load_file(str(next((cut / "checkpoint-3" / "lm").glob("*.safetensors"))))
    w6 = load_file(str(next((cut / "checkpoint-6" / "lm").glob("*.safetensors"))))
    assert w3.keys() == w6.keys() and all(torch.equal(w3[k], w6[k]) for k in w3)


def test_shard_stream_sigterm_then_resume_sees_every_record_once(tmp_path):
    from mmtune.data.shards import write_shards

    shards = tmp_path / "shards"
    write_shards(MIXED, shards, max_count=7, image_root=str(FIX), progress=False)
    assert len(list(shards.glob("*.tar"))) >= 3
    base, cut = tmp_path / "base", tmp_path / "cut"
    common = ("--max-steps", "5", "data.shuffle_buffer=8")
    assert train(mllm_args(base, *common, data=shards)) == 0
    rc = train(mllm_args(cut, *common, data=shards), fault="sigterm@2")
    assert rc == 143  # stopped on request, after saving
    assert [s for s, _ in ckpt.list_checkpoints(cut)] == [2]
    assert steps(cut) == [1, 2]
    assert train(mllm_args(cut, *common, "--resume-from", "latest", data=shards)) == 0
    assert_same_run(base, cut)
    rows = read_metrics(base / "metrics.jsonl")
    assert sum(r["images"] for r in rows) > 0  # image records really went through the tower


# --------------------------------------------------------------------------- #
# Guards
# --------------------------------------------------------------------------- #


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(llm_base, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(llm_args(out, *LLM_BASE), fault="nan@4") == 2
    err = capsys.readouterr().err
    assert "loss is NaN/inf at step 4" in err and "checkpoint-2" in err and "ids [" in err
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    assert steps(out) == [1, 2, 3]
    assert losses(out) == losses(llm_base)[:3]
    # The last good checkpoint resumes (without the fault) to the reference run.
    assert train(llm_args(out, *LLM_BASE, "--resume-from", "latest")) == 0
    assert_same_run(out, llm_base)


def test_oom_names_the_batch_saves_and_resumes(llm_base, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(llm_args(out, *LLM_BASE[:2]), fault="oom@3") == 2
    err = capsys.readouterr().err
    for part in ("out of memory at step 3", "ids [", "row lengths", "image(s)", "train.batch_size (now 4",
                 "data.max_length (now 256)", "train.gradient_checkpointing=true", "checkpoint-2"):
        assert part in err, part
    # The last completed step was saved even though save_every is 0.
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]
    assert train(llm_args(out, *LLM_BASE[:2], "--resume-from", "latest")) == 0
    assert_same_run(out, llm_base)


def test_oom_in_the_optimizer_step_says_what_holds_the_memory(tmp_path, capsys, monkeypatch):
    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated in AdamW.step)")

    monkeypatch.setattr(torch.optim.AdamW, "step", no_memory)
    assert train(llm_args(tmp_path, "--max-steps", "2"), trace=False) == 2
    err = capsys.readouterr().err
    assert "out of memory in the optimizer step of step 1" in err
    assert "train.lora.enabled=true" in err and "trainable parameters" in err
    assert "parameters in float32" in err and "train.distributed=fsdp" in err  # the real state dtype


def test_record_without_trainable_tokens_is_a_counted_skip(tmp_path):
    data = tmp_path / "data.jsonl"
    lines = TEXT.read_text().splitlines()
    long_prompt = " ".join(["describe every colour of the rainbow in order"] * 40)
    for i in range(2):
        lines.insert(3 + 5 * i, json.dumps({
            "id": f"too-long-{i}", "images": [],
            "messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "Red."}]}))
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert train(llm_args(out, "--max-steps", "8", data=data)) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in rows)
    last = rows[-1]
    assert last["skips"].get("no_trainable_tokens", 0) >= 2 and last["skipped"] == sum(last["skips"].values())
    log_text = (out / "train.log").read_text()
    assert "too-long-0" in log_text and "too-long-1" in log_text and "no_trainable_tokens" in log_text
    seen = {i for _, _, ids in batch_ids(out) for i in ids}
    assert not seen & {"too-long-0", "too-long-1"}
    state = ckpt.read_trainer_state(ckpt.latest_checkpoint(out))
    assert state["skip_counts"]["no_trainable_tokens"] == last["skips"]["no_trainable_tokens"]


def test_resume_refuses_a_changed_model_or_process_count(llm_base, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(llm_base, out)
    assert main(llm_args(out, *LLM_BASE, "--resume-from", "latest", "model.lm.config.hidden_size=32")) == 2
    assert "model config changed" in capsys.readouterr().err
    state = ckpt.read_trainer_state(out / "checkpoint-6")
    state["world_size"] = 2
    write_json_atomic(state, out / "checkpoint-6" / "trainer_state.json")
    assert main(llm_args(out, *LLM_BASE, "--resume-from", "latest")) == 2
    assert "same number of processes" in capsys.readouterr().err
    assert main(llm_args(out, *LLM_BASE, "--resume-from", str(out / "checkpoint-4"), "train.lora.enabled=true")) == 2
    assert "optimizer state does not fit" in capsys.readouterr().err
    # A smaller batch size (as after an OOM) resumes from the start of the interrupted buffer.
    assert main(llm_args(out, "--max-steps", "5", "--resume-from", str(out / "checkpoint-4"),
                         "train.batch_size=2")) == 0
    assert "batching settings changed" in capsys.readouterr().err
    assert steps(out) == [1, 2, 3, 4, 5]
    # A finished run resumed with the same max_steps has nothing left to do.
    shutil.rmtree(out / "checkpoint-6")
    assert main(llm_args(out, "--max-steps", "4", "--resume-from", "latest")) == 0
    assert "nothing to do" in capsys.readouterr().out


# --------------------------------------------------------------------------- #
# Two stages
# --------------------------------------------------------------------------- #


def test_align_then_instruct_from_the_align_projector(tmp_path, capsys):
    from safetensors.torch import load_file

    from mmtune.model.build import build_model

    align = tmp_path / "align"
    assert train(mllm_args(align, "--max-steps", "2", "train.stage=align"), trace=False) == 0
    printed = capsys.readouterr().out
    assert "stage align" in printed and "projector" in printed
    lm_line = next(x for x in printed.splitlines() if x.strip().startswith("lm"))
    assert lm_line.split()[1] == "0"  # LM frozen in align
    # Only the projector moved: the saved LM equals a fresh build with the same seed.
    cfg = load_config(align / "run_config.yaml", RunConfig)
    torch.manual_seed(cfg.train.seed)
    fresh = build_model(cfg.model)
    saved_proj = load_file(str(align / "checkpoint-2" / "projector.safetensors"))
    assert any(not torch.equal(saved_proj[k], v) for k, v in fresh.model.projector.state_dict().items())
    from mmtune.model.io import load_model

    aligned = load_model(align)
    for k, v in fresh.model.lm.state_dict().items():
        assert torch.equal(aligned.model.lm.state_dict()[k], v), k

    # Resuming an align checkpoint as stage instruct is refused with the way to do it instead.
    assert main(mllm_args(tmp_path / "x", "--resume-from", str(align / "checkpoint-2"))) == 2
    assert "set model.projector.checkpoint=" in capsys.readouterr().err
    # Stage 2 starts from the align run's projector (lr 0: nothing moves, so it is still equal).
    inst = tmp_path / "instruct"
    assert train(mllm_args(inst, "--max-steps", "1", f"model.projector.checkpoint={align}", "train.lr=0"),
                 trace=False) == 0
    stage2 = load_file(str(inst / "checkpoint-1" / "projector.safetensors"))
    assert stage2.keys() == saved_proj.keys() and all(torch.equal(stage2[k], saved_proj[k]) for k in stage2)


def test_align_with_unfreeze_lm_trains_the_lm_and_stage_two_starts_from_it(tmp_path):
    """train.unfreeze_lm (ShareGPT4V-style stage 1): the LM moves in stage align, and stage 2 starts from
    that LM (model.lm.name_or_path = the checkpoint's lm/ folder) and its projector."""
    from safetensors.torch import load_file

    from mmtune.model.build import build_model

    align = tmp_path / "align"
    assert train(mllm_args(align, "--max-steps", "2", "train.stage=align", "train.unfreeze_lm=true",
                           "train.lr=1e-2"), trace=False) == 0
    cfg = load_config(align / "run_config.yaml", RunConfig)
    torch.manual_seed(cfg.train.seed)
    fresh = build_model(cfg.model).model.lm.state_dict()
    ckpt = align / "checkpoint-2"
    aligned = load_file(str(ckpt / "lm" / "model.safetensors"))
    assert any(not torch.equal(aligned[k], fresh[k]) for k in aligned if k in fresh)
    inst = tmp_path / "instruct"
    assert train(mllm_args(inst, "--max-steps", "1", "train.lr=0", "model.lm.config=null",
                           f"model.lm.name_or_path={ckpt / 'lm'}", "model.tokenizer.train_vocab_size=null",
                           f"model.tokenizer.name_or_path={ckpt / 'tokenizer'}",
                           f"model.projector.checkpoint={align}"), trace=False) == 0
    stage2 = load_file(str(inst / "checkpoint-1" / "lm" / "model.safetensors"))
    assert stage2.keys() == aligned.keys() and all(torch.equal(stage2[k], aligned[k]) for k in stage2)
