"""A shortened `mmtune demo` runs the whole pipeline through the CLI and reports honestly."""

import json
import math
from pathlib import Path

import pytest
import yaml

from mmtune.cli import main
from mmtune.demo import INSTRUCT_PROJECTOR_LR
from mmtune.errors import MMTuneError
from mmtune.eval.metrics import accuracy_interval

pytestmark = pytest.mark.slow


def test_short_demo_writes_a_complete_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative --out, as in README's `mmtune demo --out runs/demo`
    out = tmp_path / "runs" / "demo"
    assert main(["demo", "--out", "runs/demo", "--minutes", "0.3", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pool"]["records"] > 0 and len(report["pool"]["tasks"]) == 12
    assert report["selection"]["method"] == "qdit"
    assert report["selection"]["k"] > 0 and report["selection"]["seconds"] >= 0
    # The answer counts of the selected subset, per vision task, add up to that task's records in it.
    subset = [json.loads(x) for x in (out / "subset.jsonl").read_text().splitlines()]
    for task, counts in report["selection"]["answers"].items():
        assert sum(counts.values()) == sum(r["task"] == task for r in subset), task
    assert report["train"]["steps"] > 0
    # stage instruct trains the projector at its own rate (LLaVA's mm_projector_lr), align at the run's
    instruct_cfg = yaml.safe_load((out / "instruct" / "run_config.yaml").read_text())["train"]
    assert instruct_cfg["projector_lr"] == INSTRUCT_PROJECTOR_LR != instruct_cfg["lr"]
    assert yaml.safe_load((out / "align" / "run_config.yaml").read_text())["train"]["projector_lr"] is None
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
    # Per task, beside its answer prior; the targets and the token shift per task are in the report.
    per_task = report["eval"]["per_task"]
    assert {r["task"] for r in per_task if r["set"] == "seen"} >= {"colour", "count", "position", "exists"}
    assert all(0.0 < r["prior"] <= 1.0 and r["count"] > 0 for r in per_task)
    assert all(r["ci95"][0] <= r["value"] <= r["ci95"][1] for r in per_task)  # each accuracy inside its interval
    assert set(report["targets"]) >= {"seen_vision", "unseen_phrasing", "unseen_tasks"}
    assert "qdit_vs_random" not in report["targets"]  # a 0.3-minute budget has no room for the second run
    shift = report["eval"]["token_shift"]["per_task"]
    assert set(shift) == set(report["pool"]["tasks"])
    assert all(abs(r["unshifted"] + r["marginal"] + r["shifted"] - 1) < 1e-6 for r in shift.values() if r["tokens"])
    assert report["bases"]["vision"].startswith("local-dir:") and report["cpu_seconds"] > 0
    md = (out / "report.md").read_text()
    assert "| base zero-shot | base 2-shot | tuned (QDIT-k) zero-shot |" in md and "answer prior" in md
    assert "Targets (each figure with its 95% interval" in md and "![loss.png](instruct/loss.png)" in md
    lo, hi = report["targets"]["unseen_phrasing"]["ci95"]
    assert f"unseen phrasings >= 60%: {100 * report['targets']['unseen_phrasing']['tuned']:.1f} " \
           f"[{100 * lo:.1f}-{100 * hi:.1f}]" in md
    all_met = all(report["targets"][k]["met"] for k in ("seen_vision", "unseen_phrasing", "unseen_tasks"))
    assert ("why the unmet targets" in md) is (not all_met)  # an unmet target points to README's analysis


def test_demo_refuses_to_clobber(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("x")
    assert main(["demo", "--out", str(tmp_path), "--minutes", "0.3"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_targets_are_measured_not_assumed() -> None:
    """The target checks read the figures: met only when the numbers say so, and QDIT vs random names a winner."""
    from mmtune.demo import VISION_TASKS, _targets

    def res(model: str, mode: str, task: str, value: float) -> dict:
        return {"model": model, "mode": mode, "task": task, "value": value}

    results = [res("base", "zero-shot", "unseen-task", 0.10), res("base", "2-shot", "unseen-task", 0.2),
               res("tuned", "zero-shot", "unseen-task", 0.35), res("tuned", "zero-shot", "unseen-phrasing", 0.6),
               res("tuned", "zero-shot", "seen", 0.9), res("tuned-random", "zero-shot", "seen", 0.8),
               res("tuned-random", "zero-shot", "unseen-phrasing", 0.5),
               res("tuned-random", "zero-shot", "unseen-task", 0.3)]
    per_task = [{"model": "tuned", "mode": "zero-shot", "set": "seen", "task": t, "value": 0.9, "prior": 0.2}
                for t in VISION_TASKS]
    tg = _targets(results, per_task, "2-shot")
    assert tg["seen_vision"]["met"] and tg["unseen_phrasing"]["met"] and tg["unseen_tasks"]["met"]
    assert tg["qdit_vs_random"]["winner"] == "qdit"
    per_task[2]["prior"] = 0.5  # 0.9 is less than twice a 50% prior
    results[2]["value"] = 0.29  # 29 < 10 + 20
    tg = _targets(results, per_task, "2-shot")
    assert not tg["seen_vision"]["met"] and tg["seen_vision"]["each"][VISION_TASKS[2]]["ratio"] == pytest.approx(1.8)
    assert tg["seen_vision"]["each"][VISION_TASKS[2]]["reachable"]  # 2 x 50% = 100%: a perfect model meets it
    per_task[3]["prior"] = 0.52  # a yes/no task with 52% "yes": twice that is over 100%
    assert [t for t, e in _targets(results, per_task, "2-shot")["seen_vision"]["each"].items()
            if not e["reachable"]] == [VISION_TASKS[3]]
    assert not tg["unseen_tasks"]["met"]
    assert "qdit_vs_random" not in _targets(results[:5], per_task, "2-shot")
    assert tg["seen_vision"]["ci95"] is None  # no question counts, no interval
    for row in per_task:
        row["count"] = 50
    for row in results:
        row["count"] = 200
    tg = _targets(results, per_task, "2-shot")
    lo, hi = tg["seen_vision"]["ci95"]  # 0.9 over the four tasks' 200 questions
    assert lo < 0.9 < hi and (lo, hi) == pytest.approx(accuracy_interval(0.9, 200))
    assert tg["unseen_tasks"]["ci95"]["base_zero_shot"] == pytest.approx(accuracy_interval(0.10, 200))
    assert tg["unseen_phrasing"]["ci95"] == pytest.approx(accuracy_interval(0.6, 200))


def test_accuracy_interval_is_wilsons() -> None:
    """The interval the demo reports beside each target: Wilson's score interval, by its formula."""
    z = 1.959963984540054
    for k, n in [(29, 50), (0, 100), (200, 200), (1, 3)]:
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert accuracy_interval(p, n) == pytest.approx((max(0.0, centre - half), min(1.0, centre + half)), abs=1e-9)
    # a fractional mean (VQA accuracy's thirds) is read as the nearest whole number of questions right
    assert accuracy_interval(0.66, 10) == pytest.approx(accuracy_interval(0.7, 10))
    assert accuracy_interval(0.66, 10) != pytest.approx(accuracy_interval(0.6, 10))
    with pytest.raises(MMTuneError, match="at least one question"):
        accuracy_interval(0.5, 0)
    with pytest.raises(MMTuneError, match=r"in \[0, 1\]"):
        accuracy_interval(1.5, 10)


def test_demo_refuses_missing_bases_before_writing_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bases" / "lm").mkdir(parents=True)  # no clip/
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--bases", str(tmp_path / "bases"), "--minutes", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "bases are missing" in err and str(tmp_path / "bases" / "clip") in err and "--bases" in err
    assert not out.exists()


def test_demo_starts_from_the_bases_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--bases DIR`: the selection embeds images with DIR's CLIP, and the training stages load DIR's LM and tower."""
    import shutil

    import mmtune.select.api as select_api
    from mmtune.demo import DEMO_BASES, DEMO_CONFIG, _train_config

    bases = tmp_path / "my_bases"
    shutil.copytree(DEMO_BASES / "lm", bases / "lm")
    shutil.copytree(DEMO_BASES / "clip", bases / "clip")
    encoders: list[str] = []

    class Stop(Exception):
        pass

    def fake_select(*args, image_encoder=None, **kwargs):  # the encoder the demo built is all this test needs
        encoders.append(image_encoder.name)
        raise Stop

    monkeypatch.setattr(select_api, "select_records", fake_select)
    with pytest.raises(Stop):
        main(["demo", "--out", str(tmp_path / "demo"), "--bases", str(bases), "--minutes", "0.3", "--no-progress"])
    assert encoders == [f"open_clip local-dir:{(bases / 'clip').resolve()}"]
    for stage in ("align", "instruct"):
        cfg = _train_config(DEMO_CONFIG, tmp_path / stage, stage, 4, str(tmp_path / "shards"), lr=1e-3,
                            projector_from=None, seed=0, progress=False, bases=bases.resolve())
        assert cfg.model.lm.name_or_path == str((bases / "lm").resolve())
        assert cfg.model.vision.model_name == f"local-dir:{(bases / 'clip').resolve()}"
