"""Training-data features of `mmtune train`: validation loss, weighted mixtures, img2dataset shards, trackers.

Tiny CPU runs of configs/tiny_llm.yaml / tiny_mllm.yaml, a few steps each.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from mmtune.cli import main
from mmtune.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "train"
TEXT = FIX / "text.jsonl"
MIXED = FIX / "mixed.jsonl"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def llm_args(out, *extra, data=f"[{TEXT}]"):
    return ["train", str(REPO / "configs" / "tiny_llm.yaml"), "--output-dir", str(out), f"data.train={data}",
            f"model.tokenizer.train_files=[{TEXT}]", "train.batch_size=4", "train.progress=false", *extra]


def train_rows(out):
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def eval_rows(out):
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "eval_loss" in r]


# --------------------------------------------------------------------------- #
# Validation during training
# --------------------------------------------------------------------------- #


def test_validation_loss_logged_plotted_and_best_kept(tmp_path):
    from mmtune.config import RunConfig, load_config
    from mmtune.model.io import load_model
    from mmtune.train.validate import ValidationSet

    out = tmp_path / "val"
    args = llm_args(out, "--max-steps", "6", f"data.eval=[{TEXT}]", "train.eval_every=2", "train.eval_samples=5",
                    "train.save_best=true", "train.save_every=2", "train.save_total_limit=0", "train.lr=3e-3")
    assert main(args) == 0
    evals = eval_rows(out)
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(math.isfinite(r["eval_loss"]) and r["eval_examples"] == 5 and r["eval_tokens"] > 0 for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learns; eval data shares the text fixtures' style
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the validation loss is the model's at that step: recompute step 6's from checkpoint-6
    cfg = load_config(out / "run_config.yaml", RunConfig)
    bundle = load_model(out / "checkpoint-6")
    again = ValidationSet(cfg, bundle, rank=0, world_size=1).evaluate(bundle.model, "cpu", lambda t: t)
    assert again.loss == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    assert again.examples == 5
    # save_best: DIR/best holds the model of the lowest validation loss, and says which step that was
    best = min(evals, key=lambda r: r["eval_loss"])
    info = json.loads((out / "best" / "best.json").read_text())
    assert info["step"] == best["step"] and info["eval_loss"] == pytest.approx(best["eval_loss"])
    a = load_model(out / "best").model.state_dict()
    b = load_model(out / f"checkpoint-{best['step']}").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # validation does not disturb training: the same run without data.eval has the same losses
    plain = tmp_path / "plain"
    assert main(llm_args(plain, "--max-steps", "6", "train.lr=3e-3")) == 0
    assert [r["loss"] for r in train_rows(out)] == pytest.approx([r["loss"] for r in train_rows(plain)], abs=1e-7)


def test_validation_config_errors(tmp_path, capsys):
    assert main(llm_args(tmp_path / "x", "--max-steps", "2", "train.eval_every=2")) == 2
    assert "data.eval" in capsys.readouterr().err
    assert main(llm_args(tmp_path / "y", "--max-steps", "2", f"data.eval=[{TEXT}]", "train.eval_samples=-1")) == 2
