"""A tiny MLLM trained from scratch on CPU learns its image+text task (slow: about 2 minutes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_mllm_learns_shapes_and_colours(tmp_path):
    spec = importlib.util.spec_from_file_location("train_tiny_shapes", REPO / "scripts" / "train_tiny_shapes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path), "--steps", "1500"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["loss_last20"] < summary["loss_first20"] / 5
    assert summary["accuracy_by_task"]["colour"] >= 0.9 and summary["accuracy_by_task"]["shape"] >= 0.9
    assert (tmp_path / "run" / "loss.png").is_file()
