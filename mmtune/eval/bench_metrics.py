"""Scorers for MME, MMBench (CircularEval) and SEED-Bench, following each benchmark's own evaluation code.

TextVQA needs no scorer of its own: it is VQA accuracy with the EvalAI answer
processor (`mmtune.eval.metrics.score_vqa`, rule "evalai"), as LLaVA's
`eval_textvqa.py` / `m4c_evaluator.py` score it.

* `score_mme` -- the MME eval tool (`eval_tool/calculation.py` of the MME
  release, copied into LLaVA's `playground/data/eval/MME/eval_tool`): the
  prediction is lower-cased; exactly "yes"/"no" is taken as is, otherwise
  "yes" in its first four characters reads as yes, else "no" there reads as
  no, else it is "other" (wrong). Per subtask: accuracy over questions and
  accuracy+ over images (both questions of an image right); the subtask score
  is 100 x (acc + acc+). Perception = the sum over the 10 perception
  subtasks, cognition over the 4 cognition subtasks.
* `score_mmbench_circular` -- MMBench's CircularEval as VLMEvalKit runs it
  (`vlmeval/dataset/utils/multiple_choice.py`, `vlmeval/utils/matching_util.py`):
  a question is asked once per rotation of its options and counts only if
  every rotation is answered right. The answer is read by `can_infer`:
  first the option letter (`can_infer_option`: punctuation .()[],:;!*#{} to
  spaces, whitespace split, exactly one option letter among the words, and
  "A" refused as a possible article when the answer has more than 3 words;
  known refusals read as "Z"), then the option text (`can_infer_text`: the
  lower-cased text of exactly one option occurs in the lower-cased answer).
  What neither reads is wrong here (VLMEvalKit would ask a GPT judge;
  mmtune calls no remote API) and is counted in `details["unparsed"]`.
* `score_seed` -- LLaVA's `convert_seed_for_submission.py`: the answer text
  must equal the option letter (the answers file holds stripped outputs, so
  "A" is right and "A." or "(A)" wrong); accuracy overall and per question
  type (dimension).

Items carry `meta` (the record's meta) for grouping: `mme_subtask` and
`mme_image`; `circular_index` (and `answer_letter`); `question_type`.
"""

from __future__ import annotations

import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mmtune.eval.metrics import (
    DEFAULT_OPTIONS,
    SCORERS,
    MetricError,
    ScoreReport,
    _gold_index,
    _read_choices,
    _read_item,
    _read_items,
    _Tally,
    mean_stderr,
)

# --------------------------------------------------------------------------- #
# MME
# --------------------------------------------------------------------------- #

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(prediction: str) -> str:
    """"yes", "no" or "other", as the MME eval tool's `parse_pred_ans` reads a lower-cased answer."""
    pred = prediction.lower()
    if pred in ("yes", "no"):
        return pred
    head = pred[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def score_mme(items: Iterable[Mapping[str, Any]]) -> ScoreReport:
    """MME: per-subtask acc / acc+ / score, perception and cognition totals (the MME eval tool's numbers).

    The score of the report is the accuracy over all questions; the official
    totals are in `details` (`perception`, `cognition`, `per_subtask`) and
    `details["official"]`. An image whose questions were not all counted
    (a skipped question) stays out of its subtask's acc+ and is counted in
    `details["incomplete_images"]`.
    """
    tally = _Tally("mme_accuracy")
    by_image: dict[tuple[str, str], list[bool]] = defaultdict(list)
    total_q: Counter[tuple[str, str]] = Counter()
    all_items = list(items)
    for i, item in enumerate(all_items):
        meta = (item.get("meta") or {}) if isinstance(item, Mapping) else {}
        key = (str(meta.get("mme_subtask") or item.get("category") or "mme"),
               str(meta.get("mme_image") or item.get("id")))
        total_q[key] += 1
        got = _read_item(tally, item, i)
        if got is None:
            continue
        rid, pred, answers = got
        gold = answers[0].strip().lower()
        if gold not in ("yes", "no"):
            raise MetricError(f"item {rid!r}: field 'answers' must be yes or no for MME, got {answers[0]!r}")
        read = mme_parse(pred)
        ok = read == gold
        by_image[key].append(ok)
        tally.items.append({"id": rid, "score": float(ok), "read_as": read, "label": gold, "subtask": key[0]})
    per: dict[str, dict[str, Any]] = {}
    subtasks = sorted({k[0] for k in total_q})
    incomplete = 0
    for sub in subtasks:
        qs = [it for it in tally.items if it["subtask"] == sub]
        images = [k for k in by_image if k[0] == sub]
        complete = [k for k in images if len(by_image[k]) == total_q[k]]
        incomplete += len(images) - len(complete) + sum(1 for k in total_q if k[0] == sub and k not in by_image)
        acc = sum(it["score"] for it in qs) / len(qs) if qs else None
        acc_plus = sum(all(by_image[k]) for k in complete) / len(complete) if complete else None
        per[sub] = {
            "acc": acc, "acc_plus": acc_plus,
            "score": None if acc is None or acc_plus is None else 100 * acc + 100 * acc_plus,
            "questions": len(qs), "images": len(complete),
            "other_answers": sum(it["read_as"] == "other" for it in qs),
        }

    def total(names: Sequence[str]) -> float | None:
        vals = [per[n]["score"] for n in names if n in per and per[n]["score"] is not None]
        return sum(vals) if vals else None

    perception, cognition = total(MME_PERCEPTION), total(MME_COGNITION)
    missing = [n for n in (*MME_PERCEPTION, *MME_COGNITION) if n not in per]
    text = ", ".join(f"{lab} {v:.2f}" for lab, v in (("perception", perception), ("cognition", cognition))
                     if v is not None)
    report = tally.report({
        "per_subtask": per, "perception": perception, "cognition": cognition,
        "missing_subtasks": missing, "other_subtasks": [s for s in per if s not in (*MME_PERCEPTION, *MME_COGNITION)],
        "incomplete_images": incomplete,
        "official": {"name": "perception" if perception is not None else "cognition",
                     "value": perception if perception is not None else cognition, "text": text or "n/a"},
    })
    report.stderr = None  # the headline is a sum of per-subtask acc + acc+ totals, not a mean over questions
    return report


# --------------------------------------------------------------------------- #
# MMBench CircularEval
# --------------------------------------------------------------------------- #

MMBENCH_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_MMB_PUNCT = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def mmbench_infer_option(answer: str, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit's `can_infer_option`: the one option letter standing alone among the answer's words."""
    if any(r in answer for r in MMBENCH_REFUSALS):
        return "Z"
    words = [w.strip() for w in answer.translate(_MMB_PUNCT).split()]
    hits = [c for c in options if c in words]
    if len(hits) == 1:
        # "A" may be the article ("A cat is ..."): not trusted in a longer answer.
        if "A" in words and len(words) > 3:
            return None
        return hits[0]
    if not hits and ("Z" in words or "" in words):
        return "Z"
    return None


def mmbench_infer_text(answer: str, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit's `can_infer_text`: the one option whose lower-cased text occurs in the lower-cased answer."""
    low = answer.lower()
    hits = [k for k, v in options.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def mmbench_extract(answer: str, options: Mapping[str, str]) -> tuple[str | None, str]:
    """(letter or None, how): option letter first, then option text (VLMEvalKit's `can_infer`)."""
    letter = mmbench_infer_option(answer, options)
    if letter:
        return letter, "letter"
    letter = mmbench_infer_text(answer, options)
    return (letter, "text") if letter else (None, "unparsed")


def score_mmbench_circular(items: Iterable[Mapping[str, Any]]) -> ScoreReport:
    """CircularEval accuracy: a question is right only if every rotation of its options is answered right.

    Each item is one rotation: ``{"id", "prediction", "choices" (in that
    rotation's order), "answers": [gold option text or letter],
    "meta": {"circular_index", "circular_round", "answer_letter"?, "category"?, "l2_category"?}}``.
    The report's score is the circular accuracy over questions whose
    rotations were all counted; `details` adds the vanilla accuracy (round 0
    only), per-category circular accuracy and how answers were read.
    """
    tally = _Tally("mmbench_circular_accuracy")
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    totals: Counter[str] = Counter()
    how: Counter[str] = Counter()
    cats: dict[str, tuple[str | None, str | None]] = {}
    for i, item in enumerate(items):
        meta = (item.get("meta") or {}) if isinstance(item, Mapping) else {}
        group = str(meta.get("circular_index", item.get("id") if isinstance(item, Mapping) else i))
        totals[group] += 1
        cats[group] = (meta.get("category"), meta.get("l2_category"))
        got = _read_item(tally, item, i)
        if got is None:
            continue
        rid, pred, answers = got
        choices = _read_choices(item, rid)
        letters = DEFAULT_OPTIONS[: len(choices)]
        gold = meta.get("answer_letter")
        if gold not in letters:
            gold = letters[_gold_index(item, rid, answers, list(choices), DEFAULT_OPTIONS)]
        letter, way = mmbench_extract(pred, dict(zip(letters, choices)))
        how[way] += 1
        row = {"id": rid, "score": float(letter == gold), "parsed": letter, "how": way, "gold": gold,
               "round": meta.get("circular_round", 0)}
        tally.items.append(row)
        groups[group].append(row)
    complete = {g: rows for g, rows in groups.items() if len(rows) == totals[g]}
    passed = {g: all(r["score"] == 1.0 for r in rows) for g, rows in complete.items()}
    circ = sum(passed.values()) / len(passed) if passed else None
    round0 = [r["score"] for rows in complete.values() for r in rows if r["round"] == 0]
    per_cat: dict[str, dict[str, Any]] = {}
    for key, idx in (("per_category", 0), ("per_l2_category", 1)):
        acc: dict[str, list[bool]] = defaultdict(list)
        for g, ok in passed.items():
            name = cats[g][idx]
            if name:
                acc[str(name)].append(ok)
        per_cat[key] = {k: {"score": sum(v) / len(v), "count": len(v)} for k, v in sorted(acc.items())}
    report = tally.report({
        "circular_accuracy": circ, "questions": len(passed), "questions_incomplete": len(totals) - len(passed),
        "rotations_per_question": dict(Counter(len(r) for r in complete.values())),
        "vanilla_accuracy": sum(round0) / len(round0) if round0 else None,
        "parse": dict(how), "unparsed": how["unparsed"], **per_cat,
        "official": {"name": "circular_accuracy", "value": None if circ is None else 100 * circ,
                     "text": "n/a" if circ is None else f"{100 * circ:.2f}"},
    })
    report.score = circ
    # the units of the circular accuracy are the questions (all rotations right or not), not the rotations
    report.stderr = mean_stderr([float(ok) for ok in passed.values()])
    return report


# --------------------------------------------------------------------------- #
# SEED-Bench
# --------------------------------------------------------------------------- #


def score_seed(items: Iterable[Mapping[str, Any]]) -> ScoreReport:
    """SEED-Bench letter accuracy, overall and per question type (LLaVA's `convert_seed_for_submission.py`).

    Each item: ``{"id", "prediction", "choices", "answers": [gold letter or option text],
    "meta": {"question_type": name}}``. The stripped prediction must equal the
    gold letter exactly.
    """
    tally = _Tally("seed_accuracy")
    for item, rid, pred, answers in _read_items(tally, items):
        meta = item.get("meta") or {}
        choices = item.get("choices") or []
        gold = answers[0]
        if gold not in string.ascii_uppercase[: max(len(choices), 1)] or len(gold) != 1:
            gold = DEFAULT_OPTIONS[_gold_index(item, rid, answers, list(choices), DEFAULT_OPTIONS)]
        tally.items.append({"id": rid, "score": float(pred.strip() == gold), "gold": gold,
                            "question_type": meta.get("question_type") or item.get("category")})
    groups: dict[str, list[float]] = defaultdict(list)
    for it in tally.items:
        if it["question_type"] is not None:
            groups[str(it["question_type"])].append(it["score"])
    per = {k: {"score": sum(v) / len(v), "count": len(v)} for k, v in sorted(groups.items())}
    return tally.report({"per_question_type": per})


BENCH_SCORERS = {
    "mme": score_mme,
    "mmbench_circular": score_mmbench_circular,
    "seed": score_seed,
}
SCORERS.update(BENCH_SCORERS)
