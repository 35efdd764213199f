"""`mmtune eval` end to end on a tiny saved MLLM: outputs, prompts, split, cache, scoring, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import build_tiny

from mmtune.cli import main
from mmtune.data.schema import Record, read_records, write_records
from mmtune.data.synthetic import make_pool
from mmtune.eval import backends, run
from mmtune.eval.eval_config import load_eval_config
from mmtune.eval.generate import PromptSkip, generate_answers, generate_prompts
from mmtune.eval.tasks import (
    SHORT_ANSWER_SUFFIX,
    build_prompt,
    get_task,
    parse_mode,
    resolve_images,
)
from mmtune.model import load_model, save_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random MLLM saved as a model folder, and a synthetic pool of 5 tasks x 4 records."""
    d = tmp_path_factory.mktemp("eval")
    bundle, _ = build_tiny("tiny_mllm", initializer_range=0.3)  # varied (not constant) random outputs
    (d / "model").mkdir()
    save_model(bundle, d / "model")
    recs = make_pool(d / "pool", per_task=4, tasks=("colour", "shape", "count", "exists", "add"), seed=0)
    write_records(recs, d / "pool.jsonl")
    return d


def write_config(d: Path, out: Path, **extra) -> Path:
    cfg = {
        "models": {"base": str(d / "model"), "tuned": {"path": str(d / "model"), "modes": ["zero-shot"]}},
        "pool": [str(d / "pool.jsonl")],
        "holdout_tasks": ["count", "exists"],
        "tasks": [{"name": "count", "preset": "vqav2"}, {"name": "exists", "preset": "pope"},
                  {"name": "colour", "preset": "vqav2"}],
        "modes": ["zero-shot", "2-shot"],
        "generation": {"max_new_tokens": 3, "batch_size": 4},
        "output_dir": str(out),
        "progress": False,
        **extra,
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_eval_config_end_to_end_then_cached_rerun(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["eval", str(write_config(setup, out)), "--max-new-tokens", "3"]) == 0
    table = capsys.readouterr().out
    assert "base/zero-shot" in table and "base/2-shot" in table and "tuned/zero-shot" in table
    assert "count *" in table and "(4/4)" in table
    for name in ("results.json", "predictions.jsonl", "results.png", "split.json", "eval_config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads((out / "results.json").read_text())
    assert set(res["results"]) == {"base", "tuned"}
    assert set(res["results"]["base"]["count"]) == {"zero-shot", "2-shot"}
    assert set(res["results"]["tuned"]["count"]) == {"zero-shot"}
    e = res["results"]["base"]["exists"]["2-shot"]
    assert (e["counted"], e["skipped"], e["total"], e["k"], e["unseen"]) == (4, 0, 4, 2, True)
    assert e["metric"] == "pope_accuracy" and "f1" in e["details"] and 0.0 <= e["score"] <= 1.0
    assert res["results"]["base"]["colour"]["zero-shot"]["unseen"] is False
    assert res["unseen_tasks"] == ["count", "exists"]
    # "tuned" is the same folder as "base" here: same fingerprint, so its zero-shot answers are cache hits
    assert res["totals"] == {"generated": 24, "cached": 12}
    assert res["models"]["base"]["fingerprint"] == res["models"]["tuned"]["fingerprint"]

    split = json.loads((out / "split.json").read_text())
    assert split["unseen_tasks"] == ["count", "exists"] and split["holdout_source"] == "eval config"
    assert split["counts"]["heldout_by_task"] == {"count": 4, "exists": 4}
    assert split["counts"]["train_by_task"] == {"add": 4, "colour": 4, "shape": 4}

    preds = lines(out / "predictions.jsonl")
    assert len(preds) == 36
    few = [p for p in preds if p["mode"] == "2-shot" and p["task"] == "count"]
    pool_task = {r.id: r.task for r in read_records(setup / "pool.jsonl")}
    for p in few:
        assert len(p["shots"]) == 2 and all(pool_task[s] in ("colour", "shape") for s in p["shots"])
        assert p["prompt"].count(SHORT_ANSWER_SUFFIX) == 3 and p["prompt"].count("</s>") == 2
        assert len(p["images"]) == 3 and p["images"][-1].endswith(f"{p['id']}.png")
        assert isinstance(p["prediction"], str) and p["score"] in (0.0, 0.3, 0.6, 0.9, 1.0)
    zero = next(p for p in preds if p["mode"] == "zero-shot" and p["task"] == "count")
    assert zero["prompt"].endswith(SHORT_ANSWER_SUFFIX + " ASSISTANT:") and zero["prompt"].count("USER:") == 1

    def no_generation(*args, **kwargs):
        raise AssertionError("a fully cached rerun must not generate")

    monkeypatch.setattr(backends, "generate_prompts", no_generation)
    assert main(["eval", str(write_config(setup, out)), "--max-new-tokens", "3"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["totals"] == {"generated": 0, "cached": 36}
    assert again["results"] == {m: {t: {md: {**v, "generated": 0, "cached": 36 // 9,
                                             "generation_seconds": again["results"][m][t][md]["generation_seconds"]}
                                        for md, v in per.items()} for t, per in ts.items()}
                                for m, ts in res["results"].items()}
    assert [p["prediction"] for p in lines(out / "predictions.jsonl")] == [p["prediction"] for p in preds]


def test_cache_keys_on_generation_settings(setup, tmp_path):
    out = tmp_path / "out"
    cfg = load_eval_config(write_config(setup, out, modes=["zero-shot"], tasks=["pope"]),
                           ["tasks=[{name: exists, preset: pope, max_new_tokens: 2}]", "models.tuned=null"])
    cfg.models.pop("tuned")
    res = run.run_eval(cfg)  # the task entry's own limit (2) wins over generation.max_new_tokens (3)
    assert res["totals"] == {"generated": 4, "cached": 0}
    assert res["results"]["base"]["exists"]["zero-shot"]["max_new_tokens"] == 2
    cfg.tasks = [{"name": "exists", "preset": "pope"}]  # generation's 3 wins over the preset's 128
    res = run.run_eval(cfg)
    assert res["totals"] == {"generated": 4, "cached": 0}
    assert res["results"]["base"]["exists"]["zero-shot"]["max_new_tokens"] == 3
    assert run.run_eval(cfg)["totals"] == {"generated": 0, "cached": 4}


def test_checkpoint_mode_with_few_shot_from_training_records(setup, tmp_path, capsys):
    recs = read_records(setup / "pool.jsonl")
    write_records([r for r in recs if r.task in ("count",)], tmp_path / "eval.jsonl")
    write_records([r for r in recs if r.task in ("shape", "add")], tmp_path / "train.jsonl")
    out = tmp_path / "q"
    rc = main(["eval", str(setup / "model"), "--records", str(tmp_path / "eval.jsonl"), "--metric", "vqa",
               "--mode", "zero-shot", "--mode", "few-shot", "--k", "3", "--shots-from", str(tmp_path / "train.jsonl"),
               "--holdout-tasks", "count", "--out", str(out), "--max-new-tokens", "2", "--batch-size", "3",
               "--no-progress"])
    assert rc == 0
    assert "model/3-shot" in capsys.readouterr().out
    preds = [p for p in lines(out / "predictions.jsonl") if p["mode"] == "3-shot"]
    assert len(preds) == 4
    for p in preds:  # image queries get image examples (shape), not the text-only task
        assert [s.split("-")[1] for s in p["shots"]] == ["shape"] * 3
    res = json.loads((out / "results.json").read_text())
    assert res["results"]["model"]["count"]["3-shot"]["unseen"] is True


def test_generate_prompts_matches_generate_answers_and_batching(setup):
    bundle = load_model(setup / "model")
    recs = [resolve_images(r, None) for r in read_records(setup / "pool.jsonl")][::3]
    spec = get_task("vqav2")
    expected = generate_answers(bundle, recs, "vicuna_v1", max_new_tokens=3, batch_size=3,
                                instruction_suffix=spec.instruction_suffix)
    prompts = [build_prompt(r, spec, parse_mode("zero-shot")) for r in recs]
    batched = generate_prompts(bundle, prompts, "vicuna_v1", max_new_tokens=3, batch_size=4)
    single = generate_prompts(bundle, prompts, "vicuna_v1", max_new_tokens=3, batch_size=1)
    assert batched == expected == single
    assert len(set(batched)) > 3  # the outputs differ, so the comparison means something
    too_long = generate_prompts(bundle, prompts[:1], "vicuna_v1", max_new_tokens=10_000)
    assert too_long == [PromptSkip("prompt too long for the model's context")]


# --------------------------------------------------------------------------- #
# the metric is wired to the right answers
# --------------------------------------------------------------------------- #


def mc_records() -> list[Record]:
    return [Record(id=f"mc{i}", messages=[{"role": "user", "content": f"Pick {c}."}], task="mc",
                   choices=["red", "blue", "green"], answers=[c]) for i, c in enumerate(["red", "blue", "green"])]


@pytest.mark.parametrize("correct", [True, False])
def test_fake_generation_right_answers_score_one_wrong_score_zero(setup, tmp_path, monkeypatch, correct):
    write_records(mc_records(), tmp_path / "mc.jsonl")
    gold = {r.id: r for r in read_records(setup / "pool.jsonl")} | {r.id: r for r in mc_records()}
    letters = {"red": "A", "blue": "B", "green": "C"}

    def fake(bundle, prompts, template, **kw):
        out = []
        for p in prompts:
            r = gold[p.id]
            right = letters[r.answers[0]] if r.choices else r.answers[0]
            wrong = {"yes": "No, there is not.", "no": "yes"}.get(right, "D" if r.choices else "zebra")
            out.append(right if correct else wrong)
        return out

    monkeypatch.setattr(backends, "generate_prompts", fake)
    out = tmp_path / "out"
    tasks = [{"name": "count", "preset": "vqav2"}, {"name": "exists", "preset": "pope"},
             {"name": "add", "preset": "gqa"}, {"name": "mc", "preset": "scienceqa", "records": str(tmp_path / "mc.jsonl")}]
    assert main(["eval", str(write_config(setup, out, tasks=tasks, modes=["zero-shot", "1-shot"]))]) == 0
    res = json.loads((out / "results.json").read_text())["results"]
    for model, per_task in res.items():
        for task, per_mode in per_task.items():
            for mode, e in per_mode.items():
                assert e["score"] == (1.0 if correct else 0.0), (model, task, mode)
                assert e["counted"] == e["total"] > 0
    assert res["base"]["mc"]["zero-shot"]["details"]["parse"] == ({"letter": 3} if correct else {"out-of-range": 3})


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #


def test_missing_answers_and_images_are_counted_skips(setup, tmp_path, monkeypatch):
    recs = [r for r in read_records(setup / "pool.jsonl") if r.task == "colour"]
    recs[0].answers = None
    recs[1].images = [str(tmp_path / "gone.png")]
    write_records(recs, tmp_path / "eval.jsonl")
    monkeypatch.setattr(backends, "generate_prompts", lambda b, prompts, t, **kw: ["" for _ in prompts])
    out = tmp_path / "out"
    assert main(["eval", str(setup / "model"), "--records", str(tmp_path / "eval.jsonl"), "--metric", "vqa",
                 "--out", str(out), "--no-progress", "--holdout-tasks", ""]) == 0
    e = json.loads((out / "results.json").read_text())["results"]["model"]["colour"]["zero-shot"]
    assert (e["counted"], e["skipped"], e["total"]) == (2, 2, 4)
    assert e["skips"] == {"no reference answers": 1, f"image not found: {tmp_path / 'gone.png'}": 1}
    assert e["score"] == 0.0 and e["details"]["empty_predictions"] == 2  # empty answers are scored, and wrong
    preds = lines(out / "predictions.jsonl")
    assert [p.get("skip") for p in preds][:2] == ["no reference answers", f"image not found: {tmp_path / 'gone.png'}"]


def test_records_without_any_answers_or_with_bad_answers_are_errors(setup, tmp_path, capsys):
    recs = [r for r in read_records(setup / "pool.jsonl") if r.task == "colour"]
    for r in recs:
        r.answers = None
    write_records(recs, tmp_path / "none.jsonl")
    args = ["--metric", "vqa", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(["eval", str(setup / "model"), "--records", str(tmp_path / "none.jsonl"), *args]) == 2
    assert "none of the 4 records" in capsys.readouterr().err
    bad = json.loads(recs[0].to_json()) | {"answers": [3, 4]}
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    assert main(["eval", str(setup / "model"), "--records", str(tmp_path / "bad.jsonl"), *args]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "'answers'" in err and "list of strings" in err
    assert main(["eval", str(setup / "model"), "--records", str(tmp_path / "none.jsonl")]) == 2
    assert "give --metric" in capsys.readouterr().err


def test_scoring_a_predictions_file(setup, tmp_path, capsys):
    recs = [r for r in read_records(setup / "pool.jsonl") if r.task in ("colour", "count")]
    write_records(recs, tmp_path / "eval.jsonl")
    preds = [{"question_id": r.id, "text": r.answers[0]} for r in recs if r.task == "count"]
    preds.append({"id": "syn-colour-00000", "prediction": "zebra"})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    out = tmp_path / "out"
    args = ["eval", "--records", str(tmp_path / "eval.jsonl"), "--metric", "vqa", "--out", str(out)]
    assert main([*args, "--predictions", str(tmp_path / "p.jsonl")]) == 0
    res = json.loads((out / "results.json").read_text())["results"]["predictions"]
    assert res["count"]["predictions"]["score"] == 1.0 and res["count"]["predictions"]["counted"] == 4
    colour = res["colour"]["predictions"]
    assert (colour["score"], colour["counted"], colour["skipped"], colour["skips"]) == \
        (0.0, 1, 3, {"missing prediction": 3})
    capsys.readouterr()
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in [*preds, {"id": "nope", "text": "x"}]))
    assert main([*args, "--predictions", str(tmp_path / "p.jsonl")]) == 2
    assert "1 of 6 prediction id(s) are not in the eval records (e.g. 'nope')" in capsys.readouterr().err
    (tmp_path / "p.jsonl").write_text(json.dumps(preds[0]) + "\n" + json.dumps(preds[0]) + "\n")
    assert main([*args, "--predictions", str(tmp_path / "p.jsonl")]) == 2
    assert "p.jsonl:2: id" in capsys.readouterr().err


def test_config_errors_are_one_line(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", str(write_config(setup, out, holdout_tasks=["cnt"]))]) == 2
    assert "holdout task 'cnt' matches no record" in capsys.readouterr().err
    assert main(["eval", str(write_config(setup, out)), "generation.batch_sise=4"]) == 2
    assert "did you mean 'generation.batch_size'" in capsys.readouterr().err
    assert main(["eval", str(write_config(setup, out, pool=[], holdout_tasks=["count"], tasks=[
        {"name": "count", "preset": "vqav2", "records": str(setup / "pool.jsonl"), "select_tasks": ["count"]}]))]) == 2
    assert "few-shot modes need solved examples" in capsys.readouterr().err


def test_unseen_tasks_default_to_the_training_run_config(setup, tmp_path, monkeypatch, capsys):
    import shutil

    trained = tmp_path / "tuned"
    shutil.copytree(setup / "model", trained)
    (trained / "run_config.yaml").write_text(yaml.safe_dump({"data": {"holdout_tasks": ["count"]}}))
    monkeypatch.setattr(backends, "generate_prompts", lambda b, prompts, t, **kw: ["yes" for _ in prompts])
    out = tmp_path / "out"
    cfg = write_config(setup, out, models={"tuned": str(trained)}, holdout_tasks=None,
                       tasks=[{"name": "count", "preset": "vqav2"}, {"name": "exists", "preset": "pope"}])
    assert main(["eval", str(cfg)]) == 0
    split = json.loads((out / "split.json").read_text())
    assert split["holdout_source"] == "models' run_config.yaml data.holdout_tasks"
    assert split["evaluated_unseen_tasks"] == ["count"]
    assert split["models_trained_holdout_tasks"] == {"tuned": ["count"]}
    res = json.loads((out / "results.json").read_text())["results"]["tuned"]
    assert res["count"]["2-shot"]["unseen"] is True and res["exists"]["2-shot"]["unseen"] is False
    shots = [p["shots"] for p in lines(out / "predictions.jsonl") if p["mode"] == "2-shot"]
    assert all(not s.startswith("syn-count-") for ids in shots for s in ids)  # the unseen task never leaks
    capsys.readouterr()
    cfg = write_config(setup, out, models={"tuned": str(trained)}, holdout_tasks=["count", "exists"],
                       tasks=[{"name": "exists", "preset": "pope"}])
    assert main(["eval", str(cfg)]) == 0
    assert "model 'tuned' was trained without holding out ['exists']" in capsys.readouterr().err
