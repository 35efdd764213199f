"""Answer scorers for VQA-style tasks, reproducing the published evaluation rules.

Every scorer here is a pure function of strings, so a number mmtune reports can
be checked against the benchmark's own script:

* VQA soft accuracy (`vqa_accuracy`), two exact rules:
  - ``"evalai"``: the answer processor of the EvalAI evaluation server, as
    copied into LLaVA's ``m4c_evaluator.py`` (``EvalAIAnswerProcessor``) and
    used by lmms-eval. The prediction and every human answer are always
    normalised, then scored like LLaVA's ``TextVQAAccuracyEvaluator``.
  - ``"vqa-github"``: ``vqaEval.py`` of GT-Vision-Lab/VQA after its 2021 fix.
    Prediction and answers are only whitespace-cleaned, and both are
    normalised only when the human answers are not all identical, so
    "Orange" scores 0 against ten "orange"s while "Net." scores 1 against
    mixed answers whose majority is "net".
  Both average ``min(#matching other answers / 3, 1)`` over the leave-one-out
  subsets of the human answers (10 choose 9 for VQA v2).
* GQA exact match (LLaVA's ``convert_gqa_for_eval.py`` + GQA's ``eval.py``):
  the prediction loses trailing periods and is lower-cased, then must equal the
  gold answer as written.
* Multiple choice (LLaVA's ``eval_science_qa.py``): a bare option letter, an
  ``"X. "`` prefix, or exactly one ``"The answer is X."``; anything else is
  unparsed and counted wrong (LLaVA guesses a random index instead).
* Yes/no (POPE's ``evaluate.py`` / LLaVA's ``eval_pope.py``): keep the first
  sentence, drop commas, answer "no" when the words contain "No", "no" or
  "not", otherwise "yes"; report accuracy, precision, recall, F1, yes-ratio.

Aggregators (`score_vqa`, `score_exact_match`, `score_multiple_choice`,
`score_pope`) take items (mappings with ``id``, ``prediction``, ``answers``,
...) and return a `ScoreReport` that always says how many items it counted
and how many it skipped and why, so a denominator is never silently wrong.
`accuracy_interval` gives an accuracy's 95% (Wilson) interval over its number
of questions: how far another draw of as many questions could move it.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mmtune.errors import MMTuneError


class MetricError(MMTuneError, ValueError):
    """Bad input to a scorer (one line naming the item and field)."""


# --------------------------------------------------------------------------- #
# VQA normalisation data (identical in EvalAI's processor and vqaEval.py)
# --------------------------------------------------------------------------- #

# Keys that are capitalised ("Im", "Ive", ...) can never match after lower-casing;
# they are kept because the official table has them.
VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
VQA_NUMBER_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
VQA_ARTICLES: tuple[str, ...] = ("a", "an", "the")
VQA_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)

# The official pattern is written "(?!<=\d)": a look-*ahead* (a typo for a
# look-behind), so in effect it removes every period not followed by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official scripts call `PERIOD_STRIP.sub("", text, re.UNICODE)`, which
# passes re.UNICODE (= 32) as `count`: at most 32 periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
# "Is there a comma between digits?" decides whether punctuation is deleted
# (when true) or turned into a space; the two scripts spell it differently.
_COMMA_STRIP = {
    "evalai": re.compile(r"(?<=\d)(\,)+(?=\d)"),
    "vqa-github": re.compile(r"(\d)(\,)(\d)"),
}

VQARule = Literal["evalai", "vqa-github"]
VQA_RULES: tuple[str, ...] = ("evalai", "vqa-github")


def _check_rule(rule: str) -> None:
    if rule not in VQA_RULES:
        raise MetricError(f"unknown VQA rule {rule!r} (have: {', '.join(VQA_RULES)})")


def vqa_process_punctuation(text: str, rule: VQARule = "evalai") -> str:
    """The official `processPunctuation`: delete or space out punctuation, strip periods.

    Each mark is deleted when it touches a space somewhere in the text (or the
    text has a comma between digits), otherwise replaced by a space; then
    periods not followed by a digit are removed ("2.5" keeps its point).
    """
    _check_rule(rule)
    comma = _COMMA_STRIP[rule]
    out = text
    for p in VQA_PUNCTUATION:
        if (p + " " in text or " " + p in text) or comma.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words to digits, drop articles, fix contractions."""
    words = [VQA_NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def evalai_normalize(text: str) -> str:
    """EvalAI's answer processor (LLaVA `m4c_evaluator.EvalAIAnswerProcessor.__call__`).

    Lower-case, drop "," and "?", split "'s" off its word, clean whitespace,
    then `vqa_process_punctuation` and `vqa_process_digit_article`.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = vqa_process_punctuation(text, "evalai")
    return vqa_process_digit_article(text)


def _vqa_clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over each answer left out of min(#other answers equal to prediction / 3, 1)."""
    matches = sum(a == prediction for a in answers)
    total = 0.0
    for a in answers:
        others = matches - (a == prediction)
        total += min(1.0, others / 3)
    return total / len(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str], rule: VQARule = "evalai") -> float:
    """VQA soft accuracy of one prediction against the human answers (10 for VQA v2).

    `rule="evalai"` normalises prediction and answers with `evalai_normalize`;
    `rule="vqa-github"` follows the official script, which normalises (both
    sides) only when the answers are not all identical. Raises `MetricError`
    for a non-string prediction or an empty/non-string answer list.
    """
    _check_rule(rule)
    if not isinstance(prediction, str):
        raise MetricError(f"prediction must be a string, got {type(prediction).__name__}")
    if isinstance(answers, str) or not answers or not all(isinstance(a, str) for a in answers):
        raise MetricError("answers must be a non-empty list of strings")
    if rule == "evalai":
        pred = evalai_normalize(prediction)
        gts = [evalai_normalize(a) for a in answers]
    else:
        pred = _vqa_clean_whitespace(prediction)
        gts = [_vqa_clean_whitespace(a) for a in answers]
        if len(set(gts)) > 1:
            gts = [vqa_process_digit_article(vqa_process_punctuation(a, rule)) for a in gts]
            pred = vqa_process_digit_article(vqa_process_punctuation(pred, rule))
    return _leave_one_out_accuracy(pred, gts)


# --------------------------------------------------------------------------- #
# GQA exact match
# --------------------------------------------------------------------------- #


def gqa_normalize(prediction: str) -> str:
    """LLaVA's GQA conversion: strip whitespace (as its answer writer does), trailing periods, lower-case."""
    return prediction.strip().rstrip(".").lower()


def exact_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """GQA-style exact match: `gqa_normalize(prediction)` equals a gold answer as written."""
    golds = [answers] if isinstance(answers, str) else list(answers)
    return gqa_normalize(prediction) in golds


# --------------------------------------------------------------------------- #
# Multiple choice (ScienceQA as LLaVA scores it)
# --------------------------------------------------------------------------- #

DEFAULT_OPTIONS: tuple[str, ...] = ("A", "B", "C", "D", "E")
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # unescaped "." as in LLaVA: any character


@dataclass(frozen=True)
class ChoiceParse:
    """How a free-text answer was read as an option.

    `how` is one of "letter" (the answer is just the letter), "letter-dot"
    (starts with "X. "), "the-answer-is", "unparsed" (none of the rules, or
    several "The answer is" matches) or "out-of-range" (a letter beyond the
    question's choices, e.g. "D" for two choices).
    """

    letter: str | None
    index: int | None
    how: str

    @property
    def parsed(self) -> bool:
        return self.index is not None


def parse_choice(prediction: str, n_choices: int, options: Sequence[str] = DEFAULT_OPTIONS) -> ChoiceParse:
    """Read an option letter from a prediction with the rules of LLaVA's `eval_science_qa.py`.

    In order: the whole (whitespace-stripped) answer is an option letter; it
    starts with a letter, a period and a space; it contains exactly one
    "The answer is X" followed by any character. The letter must be one of
    the first `n_choices` options. Nothing else is guessed.
    """
    text = prediction.strip()
    if text in options:
        letter, how = text, "letter"
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        letter, how = text[0], "letter-dot"
    else:
        found = _THE_ANSWER_IS.findall(text)
        if len(found) != 1:
            return ChoiceParse(None, None, "unparsed")
        letter, how = found[0], "the-answer-is"
    allowed = list(options[:n_choices])
    if letter not in allowed:
        return ChoiceParse(letter, None, "out-of-range")
    return ChoiceParse(letter, allowed.index(letter), how)


# --------------------------------------------------------------------------- #
# Yes/no (POPE)
# --------------------------------------------------------------------------- #


def pope_normalize(prediction: str) -> str:
    """POPE's reading of an answer: "no" if its first sentence has the word No/no/not, else "yes".

    Exactly POPE's rule: text before the first ".", commas removed, split on
    single spaces. An empty answer therefore reads as "yes".
    """
    text = prediction
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


# --------------------------------------------------------------------------- #
# Aggregation
# --------------------------------------------------------------------------- #


@dataclass
class ScoreReport:
    """An aggregate score with its denominator made explicit.

    `score` is the mean over the `counted` items (None when none counted);
    `score_with_skips_as_zero` treats the `skipped` items as wrong, so both
    readings are visible. `skips` maps each skip reason to its count.
    `details` holds metric-specific numbers (breakdowns, precision/recall,
    parse statistics); `per_item` one dict per counted item. `stderr` is the
    standard error of `score` over its independent units (the sample standard
    deviation of their scores / sqrt(n), what lmms-eval reports beside a mean);
    None with fewer than two units, or when the headline is not such a mean.
    """

    metric: str
    score: float | None
    counted: int
    skipped: int
    skips: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    per_item: list[dict[str, Any]] = field(default_factory=list)
    stderr: float | None = None

    @property
    def total(self) -> int:
        return self.counted + self.skipped

    @property
    def score_with_skips_as_zero(self) -> float | None:
        if self.total == 0:
            return None
        return (self.score or 0.0) * self.counted / self.total

    def to_dict(self, *, with_items: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "metric": self.metric,
            "score": self.score,
            "stderr": self.stderr,
            "score_with_skips_as_zero": self.score_with_skips_as_zero,
            "counted": self.counted,
            "skipped": self.skipped,
            "skips": dict(self.skips),
            **self.details,
        }
        if with_items:
            out["per_item"] = list(self.per_item)
        return out

    def summary(self) -> str:
        score = "n/a" if self.score is None else f"{100 * self.score:.2f}"
        reasons = ", ".join(f"{k}: {v}" for k, v in self.skips.items())
        skip = f", skipped {self.skipped} ({reasons})" if self.skipped else ""
        return f"{self.metric}: {score} on {self.counted} item(s){skip}"


class _Tally:
    """Collects per-item results and skip reasons for one aggregate."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.skips: Counter[str] = Counter()
        self.items: list[dict[str, Any]] = []
        self.n_empty = 0

    def skip(self, reason: str) -> None:
        self.skips[reason] += 1

    def report(self, details: dict[str, Any] | None = None, score_key: str = "score") -> ScoreReport:
        scores = [it[score_key] for it in self.items]
        mean = sum(scores) / len(scores) if scores else None
        details = dict(details or {})
        details.setdefault("empty_predictions", self.n_empty)
        return ScoreReport(
            metric=self.metric, score=mean, counted=len(self.items), skipped=sum(self.skips.values()),
            skips=dict(self.skips), details=details, per_item=self.items, stderr=mean_stderr(scores),
        )


def mean_stderr(scores: Sequence[float]) -> float | None:
    """Standard error of the mean of independent scores: sample standard deviation / sqrt(n); None for n < 2."""
    return statistics.stdev(scores) / math.sqrt(len(scores)) if len(scores) >= 2 else None


def accuracy_interval(mean: float, count: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for an accuracy that is the mean of `count` per-question scores in [0, 1].

    Exact for 0/1 scores (exact match, and VQA accuracy when the human answers agree); a
    fractional mean (VQA accuracy's 1/3, 2/3) is read as round(mean x count) right of `count`.
    It says how far the accuracy could move with another draw of the same number of questions,
    not how far another training run would move it (that spread is usually larger).
    """
    from scipy.stats import binomtest

    if count <= 0:
        raise MMTuneError(f"an accuracy interval needs at least one question, got {count}")
    if not 0.0 <= mean <= 1.0:
        raise MMTuneError(f"an accuracy must lie in [0, 1], got {mean}")
    ci = binomtest(round(mean * count), count).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def _item_id(item: Mapping[str, Any], index: int) -> str:
    rid = item.get("id", item.get("question_id"))
    return str(rid) if rid is not None else f"#{index}"


def _read_choices(item: Mapping[str, Any], rid: str) -> list[str]:
    """The item's `choices`, or a MetricError naming the item when they are not a non-empty list of strings."""
    choices = item.get("choices")
    if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
        raise MetricError(f"item {rid!r}: field 'choices' must be a non-empty list of strings")
    return list(choices)


def _read_items(tally: _Tally, items: Iterable[Any]) -> Iterator[tuple[Any, str, str, list[str]]]:
    """(item, id, prediction, answers) of each usable item; the others are counted skips (`_read_item`)."""
    for i, item in enumerate(items):
        got = _read_item(tally, item, i)
        if got is not None:
            yield (item, *got)


def _read_item(
    tally: _Tally, item: Any, index: int, *, need_answers: bool = True
) -> tuple[str, str, list[str]] | None:
    """(id, prediction, answers) of one item, or None after recording why it is skipped.

    A missing or non-string prediction and missing/empty answers are counted
    skips; answers that are not a list of strings are an error (bad data).
    """
    if not isinstance(item, Mapping):
        raise MetricError(
            f"item #{index}: expected a mapping with 'prediction' and 'answers', got {type(item).__name__}"
        )
    rid = _item_id(item, index)
    pred = item.get("prediction")
    if pred is None:
        tally.skip("missing prediction")
        return None
    if not isinstance(pred, str):
        tally.skip("non-string prediction")
        return None
    answers = item.get("answers")
    if isinstance(answers, str):
        answers = [answers]
    if answers is None or (isinstance(answers, list) and not answers):
        if need_answers:
            tally.skip("no reference answers")
            return None
        answers = []
    if not isinstance(answers, (list, tuple)) or not all(isinstance(a, str) for a in answers):
        raise MetricError(f"item {rid!r}: field 'answers' must be a list of strings, got {answers!r:.80}")
    if not pred.strip():
        tally.n_empty += 1
    return rid, pred, list(answers)


def _breakdown(items: list[dict[str, Any]], key: str, score_key: str = "score") -> dict[str, dict[str, float | int]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for it in items:
        if it.get(key) is not None:
            groups[str(it[key])].append(it[score_key])
    return {k: {"score": sum(v) / len(v), "count": len(v)} for k, v in sorted(groups.items())}


def score_vqa(items: Iterable[Mapping[str, Any]], rule: VQARule = "evalai") -> ScoreReport:
    """VQA accuracy over items, with per question-type and per answer-type breakdowns.

    Each item: ``{"id", "prediction", "answers": [10 strings], "question_type"?,
    "answer_type"?}``. Breakdowns list ``{"score", "count"}`` per type; items
    without a type are left out of that breakdown only (see
    ``details["untyped"]``). ``details["answers_not_10"]`` counts items whose
    answer list is not the standard ten (they are still scored, leave-one-out).
    """
    _check_rule(rule)
    tally = _Tally(f"vqa_accuracy[{rule}]")
    n_not_10 = 0
    for item, rid, pred, answers in _read_items(tally, items):
        n_not_10 += len(answers) != 10
        tally.items.append({
            "id": rid,
            "score": vqa_accuracy(pred, answers, rule),
            "question_type": item.get("question_type"),
            "answer_type": item.get("answer_type"),
        })
    details = {
        "rule": rule,
        "per_question_type": _breakdown(tally.items, "question_type"),
        "per_answer_type": _breakdown(tally.items, "answer_type"),
        "untyped": {
            "question_type": sum(it["question_type"] is None for it in tally.items),
            "answer_type": sum(it["answer_type"] is None for it in tally.items),
        },
        "answers_not_10": n_not_10,
    }
    return tally.report(details)


def vqa_items_from_official(questions: Mapping[str, Any], annotations: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Scorer items from the official VQA json pair (questions file, annotations file), parsed.

    Each item has ``id`` (the question_id as a string), ``question``,
    ``image_id``, ``answers`` (the human answers in order) and, where the
    annotations have them, ``question_type``, ``answer_type`` and
    ``multiple_choice_answer``. Add ``prediction`` to score them.
    """
    try:
        anns = {a["question_id"]: a for a in annotations["annotations"]}
        out = []
        for q in questions["questions"]:
            qid = q["question_id"]
            if qid not in anns:
                raise MetricError(f"question {qid}: no annotation in the annotations file")
            ann = anns[qid]
            item: dict[str, Any] = {
                "id": str(qid),
                "question": q["question"],
                "image_id": q.get("image_id"),
                "answers": [a["answer"] for a in ann["answers"]],
            }
            for key in ("question_type", "answer_type", "multiple_choice_answer"):
                if key in ann:
                    item[key] = ann[key]
            out.append(item)
    except (KeyError, TypeError) as exc:
        raise MetricError(f"not the official VQA questions/annotations layout (missing {exc})") from None
    return out


def score_exact_match(items: Iterable[Mapping[str, Any]]) -> ScoreReport:
    """GQA-style exact-match accuracy (`exact_match`) over items with ``prediction`` and ``answers``."""
    tally = _Tally("exact_match")
    for item, rid, pred, answers in _read_items(tally, items):
        tally.items.append({"id": rid, "score": float(exact_match(pred, answers)), "normalized": gqa_normalize(pred)})
    return tally.report()


def _gold_index(
    item: Mapping[str, Any], rid: str, answers: list[str], choices: list[str], options: Sequence[str]
) -> int:
    """The correct choice: `answer_index`, else the answer's text among the choices, else its option letter."""
    if item.get("answer_index") is not None:
        idx = item["answer_index"]
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(choices):
            raise MetricError(f"item {rid!r}: field 'answer_index' must be an int in [0, {len(choices)}), got {idx!r}")
        return idx
    gold = answers[0]
    if gold in choices:
        return choices.index(gold)
    allowed = list(options[: len(choices)])
    if gold in allowed:
        return allowed.index(gold)
    raise MetricError(
        f"item {rid!r}: field 'answers' ({gold!r}) is neither one of the choices nor an option letter "
        f"{'/'.join(allowed)}"
    )


def score_multiple_choice(
    items: Iterable[Mapping[str, Any]], options: Sequence[str] = DEFAULT_OPTIONS
) -> ScoreReport:
    """Multiple-choice accuracy with LLaVA's ScienceQA letter parsing (`parse_choice`).

    Each item: ``{"id", "prediction", "choices": [...], "answers": [gold]}``
    where the gold is a choice's text or its letter (or give ``answer_index``).
    Unparsed and out-of-range answers count as wrong; ``details["parse"]``
    says how every counted answer was read, so the share LLaVA would have
    guessed at random is visible.
    """
    tally = _Tally("multiple_choice_accuracy")
    how: Counter[str] = Counter()
    for i, item in enumerate(items):
        has_index = isinstance(item, Mapping) and item.get("answer_index") is not None
        got = _read_item(tally, item, i, need_answers=not has_index)
        if got is None:
            continue
        rid, pred, answers = got
        choices = _read_choices(item, rid)
        if len(choices) > len(options):
            raise MetricError(f"item {rid!r}: {len(choices)} choices but only {len(options)} option letters")
        gold = _gold_index(item, rid, answers, list(choices), options)
        parse = parse_choice(pred, len(choices), options)
        how[parse.how] += 1
        tally.items.append({
            "id": rid, "score": float(parse.index == gold), "parsed": parse.letter, "how": parse.how,
            "gold": options[gold],
        })
    unparsed = how["unparsed"] + how["out-of-range"]
    return tally.report({"parse": dict(how), "unparsed": unparsed})


def _yes_no_label(value: str, rid: str) -> str:
    label = value.strip().lower()
    if label not in ("yes", "no"):
        raise MetricError(f"item {rid!r}: field 'answers' must be 'yes' or 'no' for a yes/no task, got {value!r}")
    return label


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def score_pope(items: Iterable[Mapping[str, Any]]) -> ScoreReport:
    """POPE yes/no scoring: accuracy (the score), precision, recall, F1 and yes-ratio.

    Each item: ``{"id", "prediction", "answers": ["yes"|"no"]}``; predictions
    are read with `pope_normalize`, "yes" is the positive class. Precision,
    recall or F1 are None where their denominator is zero (POPE's script
    would divide by zero).
    """
    tally = _Tally("pope_accuracy")
    tp = fp = tn = fn = 0
    for item, rid, pred, answers in _read_items(tally, items):
        label = _yes_no_label(answers[0], rid)
        read = pope_normalize(pred)
        tp += read == "yes" and label == "yes"
        fp += read == "yes" and label == "no"
        tn += read == "no" and label == "no"
        fn += read == "no" and label == "yes"
        tally.items.append({"id": rid, "score": float(read == label), "read_as": read, "label": label})
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and (precision + recall) > 0
        else None
    )
    n = tp + fp + tn + fn
    details = {
        "accuracy": _ratio(tp + tn, n), "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": _ratio(tp + fp, n), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }
    return tally.report(details)


SCORERS: dict[str, Callable[..., ScoreReport]] = {
    "vqa": score_vqa,
    "exact_match": score_exact_match,
    "multiple_choice": score_multiple_choice,
    "pope": score_pope,
}


# Metrics whose records are multiple choice (choices listed in the prompt, letter answers).
MULTIPLE_CHOICE_METRICS = frozenset({"multiple_choice", "mmbench_circular", "seed"})
# The benchmark scorers (MME, MMBench CircularEval, SEED-Bench) live in their own module, which builds on
# this one's helpers and adds itself to SCORERS when imported; mmtune/eval/__init__.py imports it, so the
# registry is complete whichever eval module is imported first (and this module imports nothing above it).


def get_scorer(name: str) -> Callable[..., ScoreReport]:
    """A scorer by name (`vqa`, `exact_match`, `multiple_choice`, `pope`, `mme`, `mmbench_circular`, `seed`)."""
    if name not in SCORERS:
        import difflib

        close = difflib.get_close_matches(name, SCORERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise MetricError(f"unknown metric {name!r}{hint} (have: {', '.join(SCORERS)})")
    return SCORERS[name]
