"""Scoring: one (model, task, mode)'s prediction rows against the task's records, and reading a predictions file.

Contract. `score_rows(spec, records, rows)` takes one row per task record
(`id` plus a `prediction` or a `skip` reason), scores the predictions with the
task's metric (`mmtune.eval.metrics.SCORERS`), writes `score` (or the scorer's
skip reason) into each row and returns the results entry: `metric`, `score`,
`score_with_skips_as_zero`, `counted`, `skipped`, `total`, `skips` (reason ->
count) and the metric's `details`. counted + skipped always equals the number
of records (checked: a wrong denominator is a bug, never a silent result).
`read_predictions(path)` reads an existing answers file (mmtune's `id` /
`prediction` or LLaVA's `question_id` / `text`) as id -> prediction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from mmtune.data.schema import Record
from mmtune.errors import MMTuneError
from mmtune.eval.metrics import MetricError, ScoreReport, get_scorer
from mmtune.eval.tasks import TaskSpec


def _scorer(spec: TaskSpec) -> Callable[[list[dict[str, Any]]], ScoreReport]:
    fn = get_scorer(spec.metric)
    return partial(fn, rule=spec.vqa_rule) if spec.metric == "vqa" else fn


def score_rows(spec: TaskSpec, records: Sequence[Record], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Score one (model, task, mode): rows hold `id` and `prediction` or a `skip` reason.

    Returns the results entry; adds `score` to each scored row. The counts
    always add up: counted + skipped == number of task records.
    """
    by_id = {r.id: r for r in records}
    items = []
    pre_skips: Counter[str] = Counter()
    for row in rows:
        if row.get("skip"):
            pre_skips[row["skip"]] += 1
            continue
        rec = by_id[row["id"]]
        items.append({
            "id": rec.id, "prediction": row.get("prediction"), "answers": rec.answers, "choices": rec.choices,
            "question_type": rec.meta.get("question_type"), "answer_type": rec.meta.get("answer_type"),
            "category": rec.meta.get("category"), "meta": rec.meta,
        })
    try:
        report = _scorer(spec)(items)
    except MetricError as exc:
        raise MetricError(f"task {spec.name!r}: {exc}") from None
    per_item = {it["id"]: it for it in report.per_item}
    skipped_by_scorer = {it["id"] for it in items} - set(per_item)
    for row in rows:
        if row["id"] in per_item:
            row["score"] = per_item[row["id"]]["score"]
        elif row["id"] in skipped_by_scorer and not row.get("skip"):
            row["skip"] = _scorer_skip_reason(row)
    skips = Counter(report.skips) + pre_skips
    counted, skipped = report.counted, report.skipped + sum(pre_skips.values())
    if counted + skipped != len(records):  # a bug, never a silently wrong denominator
        raise MMTuneError(f"task {spec.name!r}: {counted} counted + {skipped} skipped != {len(records)} records")
    total = counted + skipped
    return {
        "metric": report.metric,
        "score": report.score,
        "stderr": report.stderr,
        "score_with_skips_as_zero": (report.score or 0.0) * counted / total if total else None,
        "counted": counted,
        "skipped": skipped,
        "total": total,
        "skips": dict(skips),
        "details": report.details,
    }


def _scorer_skip_reason(row: dict[str, Any]) -> str:
    pred = row.get("prediction")
    return "missing prediction" if pred is None else "non-string prediction" if not isinstance(pred, str) \
        else "no reference answers"


PREDICTION_ID_KEYS = ("id", "question_id")
PREDICTION_TEXT_KEYS = ("prediction", "text", "answer")


def read_keyed_jsonl(path: str | Path, where: str, id_keys: Sequence[str] = PREDICTION_ID_KEYS,
                     duplicate_hint: str = "") -> dict[str, dict[str, Any]]:
    """id -> JSON object for an answers-style JSONL file (one object per line, each with an id).

    The id is the first of `id_keys` present (as a string). A missing file
    (named by `where`), bad JSON, a line that is not an object, a line without
    an id or an id seen before is a one-line error naming the line.
    """
    from mmtune.data.schema import iter_jsonl

    path = Path(path)
    if not path.is_file():
        raise MMTuneError(f"{where}: {path} not found")
    out: dict[str, dict[str, Any]] = {}
    for line, obj in iter_jsonl(path):
        if isinstance(obj, Exception):
            raise obj
        if not isinstance(obj, dict):
            raise MMTuneError(f"{path}:{line}: expected a JSON object")
        rid = next((obj[k] for k in id_keys if obj.get(k) is not None), None)
        if rid is None:
            raise MMTuneError(f"{path}:{line}: no id (one of {', '.join(id_keys)})")
        rid = str(rid)
        if rid in out:
            raise MMTuneError(f"{path}:{line}: id {rid!r} appears twice{duplicate_hint}")
        out[rid] = obj
    return out


def read_predictions(path: str | Path) -> dict[str, Any]:
    """id -> prediction from JSONL: mmtune's (`id`, `prediction`) or LLaVA's answers file (`question_id`, `text`).

    A line without an id, a duplicated id or bad JSON is an error naming the
    line; a line without a prediction field maps to None (a counted skip).
    """
    return {rid: next((obj[k] for k in PREDICTION_TEXT_KEYS if k in obj), None)
            for rid, obj in read_keyed_jsonl(path, "--predictions").items()}
