"""MME, MMBench CircularEval, SEED-Bench and TextVQA scoring on cases worked out from the official code.

Sources (read to learn the rules; mmtune's code is its own):
* MME: `eval_tool/calculation.py` of the MME release (LLaVA: playground/data/eval/MME/eval_tool/calculation.py),
  `parse_pred_ans` + `compute_metric` + `process_result`.
* MMBench: VLMEvalKit `vlmeval/utils/matching_util.py` (`can_infer_option`, `can_infer_text`, `can_infer`) and
  its circular evaluation in `vlmeval/dataset/utils/multiple_choice.py`; rotations as LLaVA's
  `llava/eval/model_vqa_mmbench.py --all-rounds`.
* SEED-Bench: LLaVA `scripts/convert_seed_for_submission.py` (`eval_single`: `row['text'] == answer`).
* TextVQA: LLaVA `llava/eval/m4c_evaluator.py` (`EvalAIAnswerProcessor`, `TextVQAAccuracyEvaluator`).
"""

from __future__ import annotations

import pytest

from mmtune.data.schema import Record
from mmtune.eval.bench_metrics import (
    mme_parse,
    mmbench_extract,
    score_mmbench_circular,
    score_mme,
    score_seed,
)
from mmtune.eval.metrics import get_scorer, score_vqa
from mmtune.eval.tasks import build_prompt, get_task, parse_mode


@pytest.mark.parametrize("pred,read", [
    ("Yes", "yes"), ("No.", "no"), ("No, there is not.", "no"), ("Yes, it is", "yes"),
    ("  yes", "other"),        # only the first 4 characters are looked at: "  ye"
    ("I think yes", "other"),  # "i th"
    ("Not sure", "no"),        # "not " contains "no"
    ("nope", "no"), ("know", "no"),  # substring rule, as in the tool
    ("There is a dog", "other"), ("", "other"),
])
def test_mme_parse_matches_parse_pred_ans(pred, read):
    assert mme_parse(pred) == read


def _mme(sub, img, k, gold, pred):
    return {"id": f"{sub}/{img}/{k}", "prediction": pred, "answers": [gold],
            "meta": {"mme_subtask": sub, "mme_image": img}}


def test_mme_acc_acc_plus_and_totals():
    items = [
        _mme("existence", "1.jpg", 0, "Yes", "Yes"), _mme("existence", "1.jpg", 1, "No", "No, there is not."),
        _mme("existence", "2.jpg", 0, "Yes", "  yes"), _mme("existence", "2.jpg", 1, "No", "Not sure"),
        _mme("count", "3.jpg", 0, "Yes", "I think yes"), _mme("count", "3.jpg", 1, "No", "nope"),
        _mme("code_reasoning", "4.png", 0, "Yes", "yes"), _mme("code_reasoning", "4.png", 1, "No", "no"),
    ]
    rep = score_mme(items)
    per = rep.details["per_subtask"]
    # existence: 3 of 4 questions right; image 1 both right, image 2 not -> acc .75, acc+ .5, score 125
    assert per["existence"]["acc"] == 0.75 and per["existence"]["acc_plus"] == 0.5
    assert per["existence"]["score"] == pytest.approx(125.0)
    assert per["existence"]["other_answers"] == 1
    assert per["count"]["score"] == pytest.approx(50.0)           # acc .5, acc+ 0
    assert per["code_reasoning"]["score"] == pytest.approx(200.0)
    assert rep.details["perception"] == pytest.approx(175.0)      # existence + count (the others absent)
    assert rep.details["cognition"] == pytest.approx(200.0)
    assert "OCR" in rep.details["missing_subtasks"]
    assert rep.score == pytest.approx(6 / 8)
    assert rep.details["official"]["text"] == "perception 175.00, cognition 200.00"
    assert rep.stderr is None  # the headline is a sum of totals: no standard error of a mean to give


def test_mme_skipped_question_leaves_its_image_out_of_acc_plus():
    items = [_mme("color", "a", 0, "Yes", "Yes"), _mme("color", "a", 1, "No", None),
             _mme("color", "b", 0, "Yes", "Yes"), _mme("color", "b", 1, "No", "No")]
    rep = score_mme(items)
    assert rep.skipped == 1 and rep.counted == 3
    assert rep.details["per_subtask"]["color"]["acc_plus"] == 1.0  # only image b is complete
    assert rep.details["incomplete_images"] == 1


OPTS = {"A": "cat", "B": "dog", "C": "a red apple", "D": "bird"}


@pytest.mark.parametrize("answer,expected", [
    ("B", ("B", "letter")),
    ("B.", ("B", "letter")),
    ("(C) a red apple", ("C", "letter")),
    ("The answer is D", ("D", "letter")),
    ("dog", ("B", "text")),                        # no letter: the one option text found in the answer
    ("A cat is here", ("A", "text")),              # "A" in a >3-word answer may be the article: letter refused
    ("It is a dog or a cat", (None, "unparsed")),  # two option texts: ambiguous
    ("B or C", (None, "unparsed")),                # two letters
    ("Cannot determine the answer", ("Z", "letter")),  # a known refusal
])
def test_mmbench_extraction_follows_can_infer(answer, expected):
    assert mmbench_extract(answer, OPTS) == expected


def _rot(index, r, choices, gold_letter, pred, cat="reasoning"):
    return {"id": f"{index}-r{r}", "prediction": pred, "choices": choices, "answers": [gold_letter],
            "meta": {"circular_index": index, "circular_round": r, "answer_letter": gold_letter, "category": cat}}


def test_mmbench_circular_counts_a_question_only_if_every_rotation_is_right():
    items = [
        # q1: options cat/dog/bird, gold dog, rotated left each round; all three rounds right -> passes
        _rot(1, 0, ["cat", "dog", "bird"], "B", "B"),
        _rot(1, 1, ["dog", "bird", "cat"], "A", "dog"),
        _rot(1, 2, ["bird", "cat", "dog"], "C", "C."),
        # q2: right in round 0, then always "A" (position bias): wrong in round 1 -> fails
        _rot(2, 0, ["red", "blue"], "A", "A", cat="perception"),
        _rot(2, 1, ["blue", "red"], "B", "A", cat="perception"),
    ]
    rep = score_mmbench_circular(items)
    assert rep.score == 0.5
    assert rep.details["circular_accuracy"] == 0.5
    assert rep.details["vanilla_accuracy"] == 1.0      # round 0 alone would have said 100%
    assert rep.details["per_category"] == {"perception": {"score": 0.0, "count": 1},
                                           "reasoning": {"score": 1.0, "count": 1}}
    assert rep.details["official"]["text"] == "50.00"
    assert rep.counted == 5  # rotations (records) counted; questions are in details
    assert rep.details["parse"] == {"letter": 4, "text": 1}


def test_mmbench_circular_incomplete_question_and_unparsed():
    items = [_rot(3, 0, ["x", "y"], "A", "A"), _rot(3, 1, ["y", "x"], "B", None),
             _rot(4, 0, ["left", "right"], "B", "no idea"), _rot(4, 1, ["right", "left"], "A", "A")]
    rep = score_mmbench_circular(items)
    assert rep.details["questions"] == 1 and rep.details["questions_incomplete"] == 1
    assert rep.score == 0.0 and rep.details["unparsed"] == 1
    assert rep.skipped == 1


def test_seed_exact_letter_per_dimension():
    ch = ["a", "b", "c", "d"]
    items = [
        {"id": "1", "prediction": "A", "choices": ch, "answers": ["A"], "meta": {"question_type": "Scene Understanding"}},
        {"id": "2", "prediction": "A.", "choices": ch, "answers": ["A"], "meta": {"question_type": "Scene Understanding"}},
        {"id": "3", "prediction": " B ", "choices": ch, "answers": ["B"], "meta": {"question_type": "Instance Identity"}},
        {"id": "4", "prediction": "b", "choices": ch, "answers": ["B"], "meta": {"question_type": "Instance Identity"}},
        {"id": "5", "prediction": "C", "choices": ch, "answers": ["c"], "meta": {"question_type": "Instance Identity"}},
    ]
    rep = score_seed(items)
    assert rep.score == pytest.approx(3 / 5)  # "A." and lower-case "b" are not the letter
    assert rep.details["per_question_type"] == {
        "Instance Identity": {"score": pytest.approx(2 / 3), "count": 3},
        "Scene Understanding": {"score": 0.5, "count": 2},
    }


def test_textvqa_preset_is_evalai_vqa_accuracy_with_ocr_prompt():
    spec = get_task("textvqa")
    assert spec.metric == "vqa" and spec.vqa_rule == "evalai" and spec.ocr_tokens
    # "Coca-Cola." normalises to "coca cola" (hyphen between letters -> space, period dropped): 2 of 10 humans
    answers = ["coca cola", "Coca-Cola"] + ["pepsi"] * 8
    assert score_vqa([{"id": "q", "prediction": "Coca-Cola.", "answers": answers}]).score == pytest.approx(0.6)
    rec = Record(id="q", messages=[{"role": "user", "content": "<image>\nwhat brand is this?"}], images=["x.jpg"],
                 answers=answers, meta={"ocr_tokens": ["COCA", "Cola", "330ml"]})
    prompt = build_prompt(rec, spec, parse_mode("zero-shot"))
    assert prompt.messages[-1]["content"] == ("<image>\nwhat brand is this?\nReference OCR token: COCA, Cola, 330ml"
                                              "\nAnswer the question using a single word or phrase.")
    no_ocr = Record(id="r", messages=rec.messages, images=["x.jpg"], answers=answers)
    assert "OCR" not in build_prompt(no_ocr, spec, parse_mode("zero-shot")).messages[-1]["content"]


@pytest.mark.parametrize("preset,metric,suffix", [
    ("mme", "mme", "\nAnswer the question using a single word or phrase."),
    ("mmbench", "mmbench_circular", "\nAnswer with the option's letter from the given choices directly."),
    ("seed", "seed", "\nAnswer with the option's letter from the given choices directly."),
])
def test_new_presets_use_llava15_suffixes(preset, metric, suffix):
    spec = get_task(preset)
    assert spec.metric == metric and spec.instruction_suffix == suffix
    assert get_scorer(metric) is not None
    if spec.is_multiple_choice:
        rec = Record(id="m", messages=[{"role": "user", "content": "<image>\nhint\nWhich animal?"}], images=["i.png"],
                     choices=["cat", "dog"], answers=["dog"])
        text = build_prompt(rec, spec, parse_mode("zero-shot")).messages[-1]["content"]
        assert text == "<image>\nhint\nWhich animal?\nA. cat\nB. dog" + suffix
