"""Two processes on CPU (`accelerate launch`, gloo): one draws text-only batches, the other image batches.

The data alternates image and text records line by line, and the stream
splits JSONL files by line across ranks, so rank 0 only ever draws image
batches and rank 1 only text-only ones. Under DDP a rank whose batch does not
touch the projector would leave its gradient all-reduce unmatched (an error or
a hang); the run must instead finish, with finite losses, and rank 1 must
never have been given an image.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cpu_launch_env, free_port

from mmtune.train import checkpoint as ckpt
from mmtune.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "train"


def _alternating(path: Path) -> None:
    image = [x for x in (FIX / "mixed.jsonl").read_text().splitlines() if json.loads(x)["images"]]
    text = (FIX / "text.jsonl").read_text().splitlines()
    lines = [x for pair in zip(image, text, strict=False) for x in pair]
    path.write_text("\n".join(lines) + "\n")


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.timeout(600)
def test_two_processes_text_only_and_image_batches_do_not_hang(tmp_path):
    data = tmp_path / "alternating.jsonl"
    _alternating(data)
    out = tmp_path / "run"
    # What a user types on a machine without GPUs (`--multi_gpu` only picks the
    # torchrun-style launcher; mmtune switches accelerate to gloo on CPU).
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "mmtune.cli", "train", str(REPO / "configs" / "tiny_mllm.yaml"),
        "--output-dir", str(out), "--max-steps", "4",
        f"data.train=[{data}]", f"model.tokenizer.train_files=[{data}]", f"data.image_root={FIX}",
        "train.batch_size=2", "train.save_every=2", "train.progress=false",
    ]
    env = cpu_launch_env(MMTUNE_TRACE_BATCHES="1")
    try:
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired as exc:  # a hang is the failure this test exists for
        pytest.fail(f"2-process training did not finish in 400 s (hang?): {str(exc.stderr)[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout

    rank0, rank1 = _rows(out / "batches.jsonl"), _rows(out / "batches-rank1.jsonl")
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == [1, 2, 3, 4]
    assert all(n == 1 for r in rank0 for n in r["num_images"])  # images only on rank 0
    assert all(n == 0 for r in rank1 for n in r["num_images"])  # and no dummy image on rank 1
    assert not {i for r in rank0 for i in r["ids"]} & {i for r in rank1 for i in r["ids"]}

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["examples"] == 4 * r["step"] for r in rows)  # 2 processes x batch 2
    assert all(r["images"] == 2 for r in rows)
    state = ckpt.read_trainer_state(out / "checkpoint-4")
    assert state["world_size"] == 2 and len(state["data_state"]) == 2
    assert (out / "checkpoint-4" / "rng.pt").is_file() and (out / "checkpoint-4" / "rng-rank1.pt").is_file()
