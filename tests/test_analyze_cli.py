"""`mmtune analyze token-shift|consistency|judge` on tiny saved runs (the demo's layout: RUN/checkpoint-N)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TRAIN_FIX, build_tiny, save_run

from mmtune.cli import main
from mmtune.data.schema import Record, read_records, write_records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny random MLLM runs (different seeds, same tokenizer) and records with and without images."""
    d = tmp_path_factory.mktemp("analyze")
    for name, seed in (("base", 0), ("tuned", 1)):
        bundle, cfg = build_tiny("tiny_mllm", seed=seed, initializer_range=0.3)
        save_run(bundle, cfg, d / name, step=2, template="vicuna_v1")
    recs = [r for r in read_records(TRAIN_FIX / "mixed.jsonl")][:6]
    mc = [
        Record(id=f"mc-{i}", messages=[{"role": "user", "content": q}], task="facts", choices=c, answers=[c[g]])
        for i, (q, c, g) in enumerate([
            ("What colour is the sky?", ["blue", "red", "green"], 0),
            ("Two plus two is", ["three", "four"], 1),
            ("The shape with three sides is a", ["circle", "square", "triangle"], 2),
            ("Which is a fruit?", ["apple", "stone"], 0),
        ])
    ]
    mc.append(Record(id="mc-img", messages=[{"role": "user", "content": "<image>\nWhat colour is it?"}],
                     images=[str(TRAIN_FIX / "images" / "red_circle.png")], task="colour", choices=["red", "blue"],
                     answers=["red"]))
    mc.append(Record(id="mc-one", messages=[{"role": "user", "content": "Only one?"}], choices=["yes"], answers=["yes"]))
    write_records(recs, d / "data.jsonl")
    write_records(mc, d / "mc.jsonl")
    return d


def args_common(out: Path) -> list[str]:
    return ["--out", str(out), "--no-progress", "--batch-size", "4"]


def test_token_shift_writes_json_png_table_and_is_unshifted_against_itself(runs, tmp_path, capsys):
    out = tmp_path / "self"
    rc = main(["analyze", "token-shift", str(runs / "tuned"), str(runs / "tuned"), "--data", str(runs / "data.jsonl"),
               "--image-root", str(TRAIN_FIX), "--max-new-tokens", "6", *args_common(out)])
    assert rc == 0
    rep = json.loads((out / "token_shift.json").read_text())
    assert (out / "token_shift.png").stat().st_size > 0
    assert rep["tokens"] > 0
    # A model's own greedy tokens are its own top-1 tokens: 100% unshifted, per task too.
    assert rep["shares"]["unshifted"] == 1.0
    assert all(v["unshifted"] == 1.0 for v in rep["per_task"].values() if v["tokens"])
    assert set(rep["per_task"]) == {r.task for r in read_records(runs / "data.jsonl")}
    text = capsys.readouterr().out
    assert "unshifted %" in text and "top shifted tokens" in text

    out2 = tmp_path / "pair"
    assert main(["analyze", "token-shift", str(runs / "base"), str(runs / "tuned"), "--data", str(runs / "data.jsonl"),
                 "--image-root", str(TRAIN_FIX), "--max-new-tokens", "6", *args_common(out2)]) == 0
    rep2 = json.loads((out2 / "token_shift.json").read_text())
    assert rep2["shares"]["unshifted"] < 1.0  # another model's greedy tokens are not all base's top-1
    assert sum(rep2["counts"].values()) == rep2["tokens"] == sum(v["tokens"] for v in rep2["per_task"].values())
    assert rep2["base"]["path"].endswith("checkpoint-2") and rep2["base"]["backend"] == "mmtune"


def test_consistency_states_its_measure_and_is_one_against_itself(runs, tmp_path, capsys):
    out = tmp_path / "self"
    assert main(["analyze", "consistency", str(runs / "base"), str(runs / "base"), "--data", str(runs / "mc.jsonl"),
                 "--image-root", str(TRAIN_FIX), *args_common(out)]) == 0
    rep = json.loads((out / "consistency.json").read_text())
    assert rep["measure"] == "loglik" and "Pearson" in rep["measure_definition"]
    assert rep["knowledge_consistency"] == pytest.approx(1.0)
    assert rep["skips"] == {"fewer than 2 choices": 1}
    assert rep["measures"]["loglik"]["counted"] == 5  # 4 text questions + 1 image question
    corr = rep["measures"]["correctness"]
    assert corr["counted"] == 5 and corr["base_accuracy"] == corr["tuned_accuracy"]
    assert corr["value"] in (None, pytest.approx(1.0))
    assert (out / "consistency.png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "headline (--measure loglik)" in text

    out2 = tmp_path / "pair"
    assert main(["analyze", "consistency", str(runs / "base"), str(runs / "tuned"), "--data", str(runs / "mc.jsonl"),
                 "--image-root", str(TRAIN_FIX), "--measure", "correctness", *args_common(out2)]) == 0
    rep2 = json.loads((out2 / "consistency.json").read_text())
    assert rep2["measure"] == "correctness"
    assert rep2["knowledge_consistency"] == rep2["measures"]["correctness"]["value"]
    r = rep2["measures"]["loglik"]["value"]
    assert r is not None and -1.0 <= r < 0.999  # two different random models do not agree perfectly
    assert "headline (--measure correctness)" in capsys.readouterr().out


def test_judge_both_orders_position_bias_and_counts(runs, tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    qs = ["What is two plus two?", "Name a colour.", "What shape has three sides?", "Is the sky blue?"]
    a.write_text("".join(json.dumps({"id": str(i), "question": q, "prediction": ans}) + "\n"
                         for i, (q, ans) in enumerate(zip(qs, ["four", "red", "a triangle", "yes"]))))
    b.write_text("".join(json.dumps({"question_id": str(i), "text": ans}) + "\n"
                         for i, ans in enumerate(["five", "blue", "a square", "no", "extra"])))
    out = tmp_path / "judge"
    assert main(["analyze", "judge", str(a), str(b), "--judge", str(runs / "base"), *args_common(out)]) == 0
    rep = json.loads((out / "judge.json").read_text())
    assert rep["win"] + rep["tie"] + rep["loss"] == rep["counted"] == 4
    assert rep["skips"] == {"id in only one file": 1}
    v = rep["position_bias"]["verdicts"]
    assert v["first"] + v["second"] + v["tie"] == 8  # both orders of 4 items
    assert all(it["a_first"] in ("1", "2", "tie") and it["b_first"] in ("1", "2", "tie") for it in rep["items"])
    assert (out / "judge.png").stat().st_size > 0
    assert "position bias" in capsys.readouterr().out

    # Identical answers: the two orders are the same prompt, so the judge can only show position bias -> all ties.
    out2 = tmp_path / "same"
    assert main(["analyze", "judge", str(a), str(a), "--judge", str(runs / "base"), *args_common(out2)]) == 0
    rep2 = json.loads((out2 / "judge.json").read_text())
    assert rep2["tie"] == 4 and rep2["win"] == rep2["loss"] == 0
    assert rep2["position_bias"]["first_position_share"] in (0.0, 1.0)
    assert rep2["position_bias"]["order_dependent_items"] == 4


def test_judge_bad_input_is_one_line_error(runs, tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"id": "1", "prediction": "x"}) + "\n" + json.dumps({"id": "1", "prediction": "y"}) + "\n")
    assert main(["analyze", "judge", str(a), str(a), "--judge", str(runs / "base"), "--out", str(tmp_path)]) == 2
    assert f"{a}:2: id '1' appears twice" in capsys.readouterr().err
