"""A shortened `mmtune demo` runs the whole pipeline through the CLI and reports honestly."""

import json
from pathlib import Path

import pytest

from mmtune.cli import main

pytestmark = pytest.mark.slow


def test_short_demo_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--minutes", "0.3", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pool"]["records"] > 0 and len(report["pool"]["tasks"]) == 10
    assert report["selection"]["method"] == "qdit"
    assert report["selection"]["k"] > 0 and report["selection"]["seconds"] >= 0
    assert report["train"]["steps"] > 0
    assert report["train"]["loss_last"] < report["train"]["loss_first"]
    assert set(report["eval"]["unseen_tasks"]) == {"shape", "first_letter"}
    rows = report["eval"]["results"]
    assert {(r["model"], r["mode"]) for r in rows} == {("base", "zero-shot"), ("base", "2-shot"), ("tuned", "zero-shot")}
    for r in rows:
        assert set(r) >= {"model", "mode", "task", "metric", "value", "count"}
        assert r["metric"] == "vqa" and 0.0 <= r["value"] <= 1.0 and r["count"] > 0
    # The unseen split is written down, and held-out tasks never reached training.
    split = json.loads((out / "split.json").read_text())
    assert set(split["holdout_tasks"]) == {"shape", "first_letter"}
    subset_tasks = {json.loads(x)["task"] for x in (out / "subset.jsonl").read_text().splitlines()}
    assert not subset_tasks & {"shape", "first_letter"}
    for png in ["instruct/loss.png", "eval/results.png", "eval/token_shift.png", "selection/lengths.png"]:
        assert (out / png).stat().st_size > 1000, png
    md = (out / "report.md").read_text()
    assert "| tuned | zero-shot |" in md and "loss.png" in md


def test_demo_refuses_to_clobber(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("x")
    assert main(["demo", "--out", str(tmp_path), "--minutes", "0.3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
