"""Scorers against the published rules, with hand-computed expectations.

Expected values below were worked out by hand from the official scripts
(EvalAI's answer processor as in LLaVA's m4c_evaluator.py, GT-Vision-Lab
vqaEval.py after its 2021 fix, LLaVA's eval_science_qa.py, POPE's evaluate.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmtune.eval.metrics import (
    VQA_CONTRACTIONS,
    VQA_NUMBER_MAP,
    MetricError,
    evalai_normalize,
    exact_match,
    get_scorer,
    parse_choice,
    pope_normalize,
    score_exact_match,
    score_multiple_choice,
    score_pope,
    score_vqa,
    vqa_accuracy,
    vqa_items_from_official,
    vqa_process_digit_article,
    vqa_process_punctuation,
)

from conftest import SHARED_DATA

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
SHARED_SQA = SHARED_DATA / "llava" / "test_sqa_llava_13b_v0.json"


# --------------------------------------------------------------------------- #
# VQA normalisation, one step at a time
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Yes", "yes"),  # lower-case
        ("What?", "what"),  # '?' dropped by the tokenize step
        ("1,000", "1000"),  # commas dropped before punctuation handling
        ("red,blue", "redblue"),  # ... even between letters (EvalAI only)
        ("man's hat", "man 's hat"),  # "'s" split off
        ("\tnet\n", "net"),  # whitespace cleaned
        ("yes - no", "yes no"),  # '-' touching a space: deleted
        ("t-shirt", "t shirt"),  # '-' inside a word: becomes a space
        ("(hello)", "hello"),
        ("2.5", "2.5"),  # a period before a digit stays
        ("yes.", "yes"),  # other periods go
        ("a.m.", "am"),
        ("." * 40 + "x", "." * 8 + "x"),  # the official sub(..., re.UNICODE) removes at most 32
        ("two dogs", "2 dogs"),  # number words
        ("None", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("a dog", "dog"),  # articles
        ("The cat", "cat"),
        ("an", ""),
        ("dont", "don't"),  # contractions
        ("isnt it", "isn't it"),
        ("Im", "im"),  # the table's capitalised keys can never match after lower-casing
        ("3,5-6", "35 6"),
    ],
)
def test_evalai_normalize_steps(raw: str, expected: str) -> None:
    assert evalai_normalize(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("red,blue", "red blue"),  # no comma between digits: ',' becomes a space
        ("3,5-6", "356"),  # a comma between digits: every mark is deleted
        ("1,000", "1000"),
        ("hello (world)", "hello world "),  # '(' touches a space (deleted), ')' does not (spaced)
        ("Yes.", "Yes"),  # no lower-casing in this step
        ("what?", "what "),  # '?' touches no space: it becomes one (split() drops it later)
        ("it's", "it's"),  # apostrophes are not punctuation here
    ],
)
def test_vqa_github_process_punctuation(raw: str, expected: str) -> None:
    assert vqa_process_punctuation(raw, "vqa-github") == expected


def test_process_digit_article() -> None:
    assert vqa_process_digit_article("The  Two  Dogs") == "2 dogs"
    assert vqa_process_digit_article("whats an oclock") == "what's o'clock"


def test_tables_match_official_data() -> None:
    # Spot checks of the copied data (size and a few entries of each table).
    assert len(VQA_CONTRACTIONS) == 120
    assert VQA_CONTRACTIONS["somebody'd"] == "somebodyd"  # an oddity of the official table, kept
    assert VQA_CONTRACTIONS["twas"] == "'twas"
    assert VQA_NUMBER_MAP == {
        "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
        "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
    }


# --------------------------------------------------------------------------- #
# VQA soft accuracy
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_leave_one_out_soft_accuracy(k: int, expected: float) -> None:
    # k matching answers: k subsets see k-1 matches, 10-k subsets see k; each min(n/3, 1); mean of 10.
    answers = ["cat"] * k + ["dog"] * (10 - k)
    for rule in ("evalai", "vqa-github"):
        assert vqa_accuracy("cat", answers, rule) == pytest.approx(expected)


def _official_items() -> list[dict]:
    questions = json.loads((FIXTURES / "vqav2_questions.json").read_text())
    annotations = json.loads((FIXTURES / "vqav2_annotations.json").read_text())
    return vqa_items_from_official(questions, annotations)


def test_official_layout_is_read() -> None:
    items = _official_items()
    assert [it["id"] for it in items] == ["458752000", "458752001", "458752002"]
    assert items[0]["question"] == "What is this photo taken looking through?"
    assert items[0]["answers"].count("net") == 6 and len(items[0]["answers"]) == 10
    assert items[1]["answers"].count("pitcher") == 9


# (question index, prediction, evalai, vqa-github), hand-computed from the real answers:
# q0: net x6, netting, mesh, pitcher, orange; q1: pitcher x9, catcher; q2: orange x10.
REAL_CASES = [
    (0, "net", 1.0, 1.0),
    (0, "Net.", 1.0, 1.0),  # answers differ, so vqa-github normalises the prediction too
    (0, "a net", 1.0, 1.0),
    (0, "netting", 0.3, 0.3),  # one matching answer
    (0, "pitcher", 0.3, 0.3),
    (0, "nets", 0.0, 0.0),
    (1, "The pitcher.", 1.0, 1.0),
    (1, "catcher", 0.3, 0.3),
    (1, "shortstop", 0.0, 0.0),
    (2, "orange", 1.0, 1.0),
    (2, "Orange", 1.0, 0.0),  # identical answers: vqa-github compares the raw (stripped) prediction
    (2, "orange.", 1.0, 0.0),
    (2, " orange\n", 1.0, 1.0),  # whitespace is always cleaned
]


@pytest.mark.parametrize("q, prediction, evalai, github", REAL_CASES)
def test_vqa_accuracy_on_real_vqav2_questions(q: int, prediction: str, evalai: float, github: float) -> None:
    answers = _official_items()[q]["answers"]
    assert vqa_accuracy(prediction, answers, "evalai") == pytest.approx(evalai)
    assert vqa_accuracy(prediction, answers, "vqa-github") == pytest.approx(github)


def test_score_vqa_real_questions_both_rules() -> None:
    items = _official_items()
    for item, pred in zip(items, ["net", "catcher", "Orange"]):
        item["prediction"] = pred
    evalai = score_vqa(items, "evalai")
    github = score_vqa(items, "vqa-github")
    assert evalai.score == pytest.approx((1.0 + 0.3 + 1.0) / 3)
    assert github.score == pytest.approx((1.0 + 0.3 + 0.0) / 3)
    assert evalai.counted == 3 and evalai.skipped == 0
    assert evalai.details["untyped"] == {"question_type": 3, "answer_type": 3}  # this fixture has no types
    assert evalai.details["per_question_type"] == {}


def test_score_vqa_breakdowns_and_skips() -> None:
    ten = lambda *xs: list(xs) + ["zzz"] * (10 - len(xs))  # noqa: E731
    items = [
        {"id": "a", "prediction": "red", "answers": ["red"] * 10, "question_type": "what color", "answer_type": "other"},
        {"id": "b", "prediction": "blue", "answers": ten("blue"), "question_type": "what color", "answer_type": "other"},
        {"id": "c", "prediction": "no", "answers": ["yes"] * 10, "question_type": "is this", "answer_type": "yes/no"},
        {"id": "d", "prediction": None, "answers": ["yes"] * 10},
        {"id": "e", "prediction": 5, "answers": ["5"] * 10},
        {"id": "f", "prediction": "x", "answers": []},
        {"id": "g", "prediction": "", "answers": ["yes"] * 3, "question_type": "is this"},
    ]
    rep = score_vqa(items)
    assert rep.counted == 4 and rep.skipped == 3
    assert rep.skips == {"missing prediction": 1, "non-string prediction": 1, "no reference answers": 1}
    assert rep.score == pytest.approx((1.0 + 0.3 + 0.0 + 0.0) / 4)
    assert rep.score_with_skips_as_zero == pytest.approx(1.3 / 7)
    assert rep.details["per_question_type"] == {
        "is this": {"score": 0.0, "count": 2},
        "what color": {"score": pytest.approx(0.65), "count": 2},
    }
    assert rep.details["per_answer_type"]["yes/no"] == {"score": 0.0, "count": 1}
    assert rep.details["untyped"]["answer_type"] == 1
    assert rep.details["empty_predictions"] == 1 and rep.details["answers_not_10"] == 1
    assert "skipped 3" in rep.summary()
    assert rep.to_dict()["counted"] == 4
    # the standard error lmms-eval reports: sample standard deviation of the 4 counted scores / sqrt(4)
    scores = [1.0, 0.3, 0.0, 0.0]
    mean = sum(scores) / 4
    sd = (sum((x - mean) ** 2 for x in scores) / 3) ** 0.5
    assert rep.stderr == pytest.approx(sd / 2) and rep.to_dict()["stderr"] == rep.stderr


def test_standard_error_needs_two_questions_and_shows_in_the_results_table() -> None:
    from mmtune.eval.metrics import mean_stderr
    from mmtune.eval.report import format_table, markdown_table

    assert mean_stderr([]) is None and mean_stderr([1.0]) is None and mean_stderr([1.0, 1.0]) == 0.0
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(0.25)  # sd 0.5, over sqrt(4)
    one = score_exact_match([{"id": "a", "prediction": "x", "answers": ["x"]}])
    assert one.score == 1.0 and one.stderr is None
    entry = {"metric": "exact_match", "score": 0.75, "stderr": 0.25, "counted": 4, "skipped": 0, "total": 4,
             "skips": {}, "details": {}}
    report = {"results": {"m": {"t": {"zero-shot": entry}, "u": {"zero-shot": {**entry, "stderr": None}}}}}
    md = markdown_table(report)
    assert "| m | 75.00 ± 25.00 (4/4, 0 skipped) | 75.00 (4/4, 0 skipped) |" in md
    assert "75.00 ± 25.00 (4/4)" in format_table(report)


def test_bad_answers_and_rules_are_clear_errors() -> None:
    with pytest.raises(MetricError, match="item 'x'.*answers"):
        score_vqa([{"id": "x", "prediction": "a", "answers": [1, 2]}])
    with pytest.raises(MetricError, match="unknown VQA rule"):
        vqa_accuracy("a", ["a"], "vqa")  # type: ignore[arg-type]
    with pytest.raises(MetricError, match="non-empty list"):
        vqa_accuracy("a", [])
    with pytest.raises(MetricError, match="did you mean 'pope'"):
        get_scorer("popee")


# --------------------------------------------------------------------------- #
# GQA exact match
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "pred, gold, ok",
    [("Yes.", "yes", True), ("Left", "left", True), ("yes..", "yes", True), ("  no ", "no", True),
     ("on the left", "left", False), ("Yes!", "yes", False), ("yes", "Yes", False)],
)
def test_gqa_exact_match(pred: str, gold: str, ok: bool) -> None:
    assert exact_match(pred, gold) is ok


def test_score_exact_match() -> None:
    rep = score_exact_match([
        {"id": "1", "prediction": "Table.", "answers": ["table"]},
        {"id": "2", "prediction": "chair", "answers": ["table"]},
        {"id": "3", "answers": ["table"]},
    ])
    assert (rep.score, rep.counted, rep.skips) == (0.5, 2, {"missing prediction": 1})


# --------------------------------------------------------------------------- #
# Multiple choice (LLaVA ScienceQA parsing)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "pred, n, index, how",
    [
        ("B", 3, 1, "letter"),
        ("E", 5, 4, "letter"),
        (" C \n", 3, 2, "letter"),
        ("B. Paris", 3, 1, "letter-dot"),
        ("The answer is C.", 3, 2, "the-answer-is"),
        ("LECTURE: ...\n The answer is A.", 2, 0, "the-answer-is"),
        ("B.", 3, None, "unparsed"),  # "X. " needs the space (LLaVA's rule)
        ("b", 3, None, "unparsed"),  # letters are case-sensitive
        ("The answer is C", 3, None, "unparsed"),  # the pattern needs a character after the letter
        ("The answer is A. No, The answer is B.", 3, None, "unparsed"),  # two matches
        ("Answer: B", 3, None, "unparsed"),
        ("The answer is D.", 2, None, "out-of-range"),
    ],
)
def test_parse_choice(pred: str, n: int, index: int | None, how: str) -> None:
    got = parse_choice(pred, n)
    assert (got.index, got.how) == (index, how)


def test_parse_choice_on_real_llava_outputs() -> None:
    data = json.loads((FIXTURES / "sqa_llava_13b_v0_subset.json").read_text())
    for qid, text in data["outputs"].items():
        got = parse_choice(text, 5)
        if qid == "3247":
            assert got.letter == "D" and got.index == 3 != data["results"][qid]
            # LLaVA drew a random index because D is not among this question's choices.
            assert parse_choice(text, 2).how == "out-of-range"
        else:
            assert got.index == data["results"][qid], qid


def test_score_multiple_choice() -> None:
    items = [
        {"id": "1", "prediction": "The answer is B.", "choices": ["cat", "dog"], "answers": ["dog"]},
        {"id": "2", "prediction": "A", "choices": ["x", "y", "z"], "answers": ["B"]},  # gold as a letter
        {"id": "3", "prediction": "C. z", "choices": ["x", "y", "z"], "answer_index": 2},
        {"id": "4", "prediction": "I think dog", "choices": ["cat", "dog"], "answers": ["dog"]},
        {"id": "5", "prediction": "The answer is E.", "choices": ["cat", "dog"], "answers": ["cat"]},
        {"id": "6", "prediction": None, "choices": ["cat", "dog"], "answers": ["cat"]},
    ]
    rep = score_multiple_choice(items)
    assert rep.counted == 5 and rep.skipped == 1
    assert rep.score == pytest.approx(2 / 5)
    assert rep.details["parse"] == {"the-answer-is": 1, "letter": 1, "letter-dot": 1, "unparsed": 1, "out-of-range": 1}
    assert rep.details["unparsed"] == 2
    assert [it["score"] for it in rep.per_item] == [1.0, 0.0, 1.0, 0.0, 0.0]
    with pytest.raises(MetricError, match="item 'z'.*neither one of the choices"):
        score_multiple_choice([{"id": "z", "prediction": "A", "choices": ["a", "b"], "answers": ["c"]}])
    with pytest.raises(MetricError, match="choices"):
        score_multiple_choice([{"id": "z", "prediction": "A", "answers": ["a"]}])


def test_multiple_choice_parse_counts_exact() -> None:
    items = [
        {"id": "1", "prediction": "The answer is B.", "choices": ["cat", "dog"], "answers": ["dog"]},
        {"id": "2", "prediction": "A", "choices": ["x", "y"], "answers": ["x"]},
        {"id": "3", "prediction": "The answer is E.", "choices": ["cat", "dog"], "answers": ["cat"]},
        {"id": "4", "prediction": "dog", "choices": ["cat", "dog"], "answers": ["dog"]},
    ]
    rep = score_multiple_choice(items)
    assert rep.details["parse"] == {"the-answer-is": 1, "letter": 1, "out-of-range": 1, "unparsed": 1}


@pytest.mark.skipif(not SHARED_SQA.exists(), reason="optional check: ../shared/data/llava is absent")
def test_parse_choice_reproduces_llava_13b_sqa_indices() -> None:
    """LLaVA-13B's 4241 raw ScienceQA outputs: the file records LLaVA's predicted index, not the truth.

    Our parser must reproduce every recorded index; the only exception is an
    out-of-range letter, where LLaVA drew a random index.
    """
    data = json.loads(SHARED_SQA.read_text())
    assert (data["count"], data["correct"]) == (4241, 3855)
    agree, disagree = 0, []
    for qid, text in data["outputs"].items():
        got = parse_choice(text, 5)
        assert got.parsed, qid  # every output has exactly one "The answer is X."
        if got.index == data["results"][qid]:
            agree += 1
        else:
            disagree.append(qid)
    assert agree == 4240 and disagree == ["3247"]


# --------------------------------------------------------------------------- #
# POPE
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "pred, read",
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is not a dog.", "no"),
        ("no.", "no"),
        ("I do not know", "no"),
        ("The dog is there. It is not a cat.", "yes"),  # only the first sentence counts
        ("Nope.", "yes"),  # POPE's rule knows only No/no/not
        ("NO", "yes"),
        ("Not really", "yes"),
        ("no,it is", "yes"),  # commas are removed, not spaced: "noit"
        ("", "yes"),
    ],
)
def test_pope_normalize(pred: str, read: str) -> None:
    assert pope_normalize(pred) == read


def test_score_pope() -> None:
    items = [
        {"id": "1", "prediction": "Yes", "answers": ["yes"]},  # TP
        {"id": "2", "prediction": "No", "answers": ["no"]},  # TN
        {"id": "3", "prediction": "yes", "answers": ["no"]},  # FP
        {"id": "4", "prediction": "no", "answers": ["yes"]},  # FN
        {"id": "5", "prediction": "Yes.", "answers": ["yes"]},  # TP
        {"id": "6", "prediction": None, "answers": ["yes"]},
    ]
    rep = score_pope(items)
    d = rep.details
    assert (d["tp"], d["fp"], d["tn"], d["fn"]) == (2, 1, 1, 1)
    assert rep.score == pytest.approx(0.6) and d["accuracy"] == pytest.approx(0.6)
    assert d["precision"] == pytest.approx(2 / 3) and d["recall"] == pytest.approx(2 / 3)
    assert d["f1"] == pytest.approx(2 / 3) and d["yes_ratio"] == pytest.approx(0.6)
    assert rep.skipped == 1
    none_yes = score_pope([{"id": "1", "prediction": "no", "answers": ["no"]}])
    assert none_yes.details["precision"] is None and none_yes.details["f1"] is None
    with pytest.raises(MetricError, match="'yes' or 'no'"):
        score_pope([{"id": "q", "prediction": "yes", "answers": ["maybe"]}])
