"""The eval report: what `mmtune eval` writes into its output folder and prints.

Contract. `write_outputs(report, rows, out, cfg)` writes, each atomically:
`predictions.jsonl` (one line per model, mode, task and record: prompt, raw
output, prediction, score or skip reason, in a fixed key order),
`results.json` (the report dict), `results.md` (`markdown_table`: one row per
model and mode, one column per task, every cell with its standard error where
it has one, counted/total and skipped), `eval_config.yaml` (the config as run, when there is one) and
`results.png` (tasks x modes per model, `mmtune.eval.plots`). `write_split`
writes `split.json`. `format_table(report)` is the plain-text table printed at
the end; `official_cell(entry)` is a result's headline as its benchmark
reports it. Reads only the report dict: no model, no scoring.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mmtune.config import EvalConfig
from mmtune.fileio import atomic_text, write_json_atomic

RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.jsonl"
SPLIT_FILE = "split.json"
PLOT_FILE = "results.png"
CONFIG_FILE = "eval_config.yaml"
TABLE_FILE = "results.md"


def write_split(split: dict[str, Any], out: Path) -> None:
    """split.json: the holdout, each evaluated task's status and the shots' origin (see run.py)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(split, out / SPLIT_FILE)


def write_outputs(report: dict[str, Any], rows: list[dict[str, Any]], out: Path, cfg: EvalConfig | None) -> None:
    """Write predictions.jsonl, results.json, results.md, eval_config.yaml (with a config) and results.png
    (unless the config turns the plot off); the plot's path goes into `report["plot"]`."""
    import yaml

    order = ["model", "mode", "task", "id", "prompt", "images", "shots", "output", "prediction", "answers",
             "score", "skip", "cached"]
    with atomic_text(out / PREDICTIONS_FILE) as fh:
        for row in rows:
            line = {k: row[k] for k in order if k in row}
            line.update({k: v for k, v in row.items() if k not in line})
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    write_json_atomic(report, out / RESULTS_FILE)
    with atomic_text(out / TABLE_FILE) as fh:
        fh.write(markdown_table(report))
    if cfg is not None:
        with atomic_text(out / CONFIG_FILE) as fh:
            fh.write(yaml.safe_dump(asdict(cfg), sort_keys=False))
    if cfg is None or cfg.plot:
        from mmtune.eval.plots import plot_results

        report["plot"] = str(plot_results(report, out / PLOT_FILE))


def format_table(report: dict[str, Any]) -> str:
    """Tasks as rows, model/mode pairs as columns; cells are score % (counted/total)."""
    results = report["results"]
    columns = [(m, mode) for m, per_task in results.items()
               for mode in dict.fromkeys(md for per_mode in per_task.values() for md in per_mode)]
    task_names = list(dict.fromkeys(t for per_task in results.values() for t in per_task))
    unseen = set(report.get("unseen_tasks") or [])
    header = ["task"] + [f"{m}/{mode}" for m, mode in columns]
    body = []
    for t in task_names:
        row = [t + (" *" if t in unseen else "")]
        for m, mode in columns:
            e = results[m].get(t, {}).get(mode)
            if e is None:
                row.append("-")
            else:
                row.append(f"{official_cell(e)}{_stderr_text(e)} ({e['counted']}/{e['total']})")
        body.append(row)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [("score in % or the benchmark's official figure, ± its standard error where it is a mean over "
              "questions (counted/total records; the rest were skipped, see results.json)")]
    skips = [f"  {m}/{mode} {t}: " + ", ".join(f"{reason} ({n})" for reason, n in e["skips"].items())
             for m, per_task in results.items() for t, per_mode in per_task.items()
             for mode, e in per_mode.items() if e["skipped"]]
    if skips:
        notes.append("skipped:")
        notes.extend(skips[:12] + ([f"  ... and {len(skips) - 12} more"] if len(skips) > 12 else []))
    if unseen:
        notes.append("* unseen task (held out from training; few-shot examples from training tasks only)")
    metrics = {t: next((e["metric"] for per_task in results.values() for e in per_task.get(t, {}).values()), "")
               for t in task_names}
    notes.append("metrics: " + ", ".join(f"{t}={m}" for t, m in metrics.items()))
    return "\n".join(lines + notes)


def official_cell(entry: dict[str, Any]) -> str:
    """A result's headline as its benchmark reports it: the official figure when the scorer gives one
    (MME perception/cognition totals, MMBench circular accuracy), else the score in %."""
    off = (entry.get("details") or {}).get("official")
    if isinstance(off, dict) and off.get("text"):
        return str(off["text"])
    return "n/a" if entry.get("score") is None else f"{100 * entry['score']:.2f}"


def _stderr_text(entry: dict[str, Any]) -> str:
    """' ± s' in the cell's percentage points, or nothing when the result has no standard error."""
    se = entry.get("stderr")
    return "" if se is None else f" ± {100 * se:.2f}"


def markdown_table(report: dict[str, Any]) -> str:
    """results.md: one row per model (and mode), one column per benchmark; each cell the official metric
    with `counted/total` and the skipped count, so every denominator is visible."""
    results = report["results"]
    tasks = list(dict.fromkeys(t for per_task in results.values() for t in per_task))
    header = ["model"] + tasks
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(tasks)) + "|"]
    for m, per_task in results.items():
        for mode in dict.fromkeys(md for per_mode in per_task.values() for md in per_mode):
            cells = [f"{m}" + ("" if mode in ("zero-shot", "predictions") else f" ({mode})")]
            for t in tasks:
                e = per_task.get(t, {}).get(mode)
                cells.append("-" if e is None else
                             f"{official_cell(e)}{_stderr_text(e)} ({e['counted']}/{e['total']}, {e['skipped']} skipped)")
            lines.append("| " + " | ".join(cells) + " |")
    metrics = {t: next((e["metric"] for per_task in results.values() for e in per_task.get(t, {}).values()), "")
               for t in tasks}
    notes = ["", ("Cells: official metric ± its standard error where it is a mean over independent questions "
                  "(sample standard deviation / sqrt(counted), as lmms-eval reports it) (counted/total records, "
                  "skipped); see results.json for skip reasons."),
             "Metrics: " + ", ".join(f"{t} = {m}" for t, m in metrics.items()) + "."]
    models = report.get("models") or {}
    if models:
        notes.append("Models: " + "; ".join(
            f"{n} = {i.get('path', i.get('predictions', ''))} ({i.get('backend', 'predictions file')})"
            for n, i in models.items()) + ".")
    return "\n".join(lines + notes) + "\n"
