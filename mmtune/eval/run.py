"""`mmtune eval`: zero-shot / few-shot / chain-of-thought evaluation of one or more models.

One eval config lists models (name -> saved model, checkpoint or run folder),
tasks (presets from `mmtune/tasks/` or inline definitions, see
`mmtune.eval.tasks`), modes and generation settings, so "base model, k-shot"
and "tuned model, zero-shot" land in one table:

    mmtune eval configs/eval/unseen_tasks.yaml
    mmtune eval runs/tuned --records eval.jsonl --metric vqa --mode zero-shot --mode few-shot \\
        --k 4 --shots-from train.jsonl --out runs/eval
    mmtune eval --predictions answers.jsonl --records eval.jsonl --metric vqa   # score a file

The protocol, top to bottom (`run_eval`): read the config (models, tasks,
each task's answer length: `mmtune.eval.eval_config`); open every model
(`mmtune.eval.backends`; tokenizers now, weights on first generation); read
the pool, the tasks' records and the few-shot source; decide which tasks are
held out (unseen) and write `split.json`; then for every (model, task, mode):
build the prompts (`mmtune.eval.tasks`), take what `OUT/cache.jsonl` already
holds (`mmtune.eval.cache`), generate the rest with one `DecodeSettings`
(`mmtune.eval.generate`), extract and score the answers
(`mmtune.eval.scoring`), write the benchmark's submission files; last, write
the report (`mmtune.eval.report`). `score_predictions_file` is the same
protocol for a predictions file, without models. The command line (flags ->
`EvalConfig`) is `mmtune/cli/eval.py`.

Held-out (unseen) tasks are named by task or cluster (`holdout_tasks`,
`holdout_clusters`; by default the `data.holdout_tasks` of the models'
training configs). Held-out records never serve as few-shot examples, so an
unseen task's k examples come from the training tasks. Every result says
whether its task was unseen.

Outputs in OUT: `results.json` (per model, task and mode: score, counted,
skipped and why, metric details), `predictions.jsonl` (one line per model,
mode, task and record: prompt, raw output, prediction, score or skip
reason), `split.json`, `results.md`, `results.png` (tasks x modes per model),
`eval_config.yaml`, `cache.jsonl`; a results table is printed at the end.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmtune import runs
from mmtune.config import ConfigError, EvalConfig, validate_config
from mmtune.data.schema import Record, read_records
from mmtune.device import resolve_device
from mmtune.errors import MMTuneError
from mmtune.eval.backends import EvalModel, detect_backend, open_model
from mmtune.eval.benchmarks import SUBMISSION_WRITERS
from mmtune.eval.cache import CACHE_FILE, PredictionCache, cache_key, cache_settings
from mmtune.eval.eval_config import (
    decode_settings,
    max_new_tokens_by_task,
    model_entries,
    task_specs,
)
from mmtune.eval.generate import DecodeSettings, PromptSkip
from mmtune.eval.report import (
    write_outputs,
    write_split,
)
from mmtune.eval.scoring import score_rows
from mmtune.eval.tasks import (
    Mode,
    ShotSampler,
    TaskData,
    build_prompt,
    describe_split,
    extract_answer,
    is_heldout,
    load_task,
    parse_mode,
    resolve_images,
    split_unseen,
)
from mmtune.outputs import Out, check_outputs

# --------------------------------------------------------------------------- #
# Inputs: records, and which tasks are unseen
# --------------------------------------------------------------------------- #


def record_reader() -> Callable[[Path], list[Record]]:
    """A records-file reader that reads each file once (tasks and the pool often share one)."""
    cache: dict[str, list[Record]] = {}

    def read(path: Path) -> list[Record]:
        key = str(Path(path).resolve())
        if key not in cache:
            cache[key] = read_records(path)
        return cache[key]

    return read


def _read_all(paths: Sequence[str], read: Callable[[Path], list[Record]], what: str) -> list[Record]:
    out: list[Record] = []
    for p in paths:
        if not Path(p).is_file():
            raise MMTuneError(f"{what}: {p} not found")
        out.extend(read(Path(p)))
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Holdout:
    """Which tasks/clusters are unseen, and where that list came from."""

    tasks: list[str]
    clusters: list[str]
    source: str

    def covers(self, record: Record) -> bool:
        return is_heldout(record, self.tasks, self.clusters)


def _trained_holdout(folder: Path) -> list[str] | None:
    """`data.holdout_tasks` from the run_config.yaml next to a checkpoint (None when there is none)."""
    if runs.read_run_config(folder) is None:
        return None
    value = runs.run_config_value(folder, "data.holdout_tasks") or []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _resolve_holdout(cfg: EvalConfig, trained: dict[str, list[str] | None], universe: Sequence[Record]) -> Holdout:
    """The eval config's holdout lists, or (when it names none) the models' training holdout_tasks."""
    clusters = list(cfg.holdout_clusters)
    if cfg.holdout_tasks is None:
        tasks = sorted({t for v in trained.values() if v for t in v})
        holdout = Holdout(tasks, clusters, "models' run_config.yaml data.holdout_tasks" if tasks else "none")
        declared: list[str] = []
    else:
        holdout = Holdout(list(cfg.holdout_tasks), clusters, "eval config")
        declared = holdout.tasks
    if declared or clusters:  # a misspelt name would hold out nothing, silently: fail instead
        split_unseen(universe, declared, clusters, strict=True, where="the eval data (pool, shot records, task records)")
    return holdout


def _describe_protocol(
    cfg: EvalConfig, tasks: Sequence[TaskData], pool: Sequence[Record], shot_pool: Sequence[Record],
    holdout: Holdout, trained: dict[str, list[str] | None],
) -> dict[str, Any]:
    """What split.json says: the holdout, the pool's split, each evaluated task's status, the shots' origin.

    Warns about tasks only partly held out and models whose training did not
    hold out a task this eval calls unseen.
    """
    split: dict[str, Any] = {"holdout_source": holdout.source}
    if pool:
        train, held = split_unseen(pool, holdout.tasks, holdout.clusters, strict=False)
        split.update(describe_split(train, held, holdout.tasks, holdout.clusters))
    else:
        split.update({"holdout_tasks": holdout.tasks, "holdout_clusters": holdout.clusters})
    info: dict[str, dict[str, Any]] = {}
    for t in tasks:
        held = sum(holdout.covers(r) for r in t.records)
        info[t.name] = {"unseen": held == len(t.records), "records": len(t.records), "heldout_records": held,
                        "source": t.source, "metric": t.spec.metric, "prompt": t.spec.prompt,
                        "instruction_suffix": t.spec.instruction_suffix}
        if 0 < held < len(t.records):
            _log(f"warning: task {t.name!r}: only {held} of {len(t.records)} records are held out; it is not unseen")
    unseen = [n for n, i in info.items() if i["unseen"]]
    shot_tasks = Counter(r.task or "<no task>" for r in shot_pool if not holdout.covers(r))
    split.update({
        "evaluated_tasks": info,
        "evaluated_unseen_tasks": unseen,
        "shots": {"from": list(cfg.shots_from) or (["pool (held-out records removed)"] if cfg.pool else []),
                  "records_by_task": dict(sorted(shot_tasks.items())), "k": cfg.k, "seed": cfg.seed},
        "models_trained_holdout_tasks": trained,
    })
    by_name = {t.name: t for t in tasks}
    for n, v in trained.items():
        leaked = [t for t in unseen if v is not None and not all(r.task in set(v) for r in by_name[t].records)]
        if leaked:
            _log(f"warning: model {n!r} was trained without holding out {leaked} "
                 f"(its data.holdout_tasks: {v}); those tasks are not unseen for it")
    return split


# --------------------------------------------------------------------------- #
# The eval run
# --------------------------------------------------------------------------- #


@dataclass
class _ModelRun:
    """One model being evaluated: its name, lazy weights, template, fingerprint, and the run's shared state."""

    name: str
    handle: EvalModel
    fingerprint: str
    dtype: str
    cache: PredictionCache
    progress: bool


def _evaluate(run: _ModelRun, task: TaskData, mode: Mode, decode: DecodeSettings, sampler: ShotSampler | None,
              shots_root: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One (model, task, mode): build prompts, take cached outputs, generate the rest, score.

    Returns the results entry and one prediction row per task record.
    """
    settings = cache_settings(decode, run.dtype)
    rows: list[dict[str, Any]] = []
    todo: list[tuple[int, Record, str]] = []
    for rec in task.records:
        row: dict[str, Any] = {"model": run.name, "mode": mode.name, "task": task.name, "id": rec.id}
        rows.append(row)
        missing = next((p for p in rec.images if not os.path.exists(p)), None)
        if not rec.answers:
            row["skip"] = "no reference answers"
        elif rec.images and not run.handle.takes_images:
            row["skip"] = "record has images but the model is text-only"
        elif missing is not None:
            row["skip"] = f"image not found: {missing}"
        if row.get("skip"):
            continue
        shots = [resolve_images(s, shots_root) for s in sampler.sample(rec, mode.k)] if sampler else []
        if shots:
            row["shots"] = [s.id for s in shots]
        prompt = build_prompt(rec, task.spec, mode, shots)
        row["prompt"] = run.handle.render(prompt.messages, prompt.meta)
        row["images"] = list(prompt.images)
        key = cache_key(run.fingerprint, task.name, rec.id, row["prompt"], prompt.images, settings)
        cached = run.cache.get(key)
        if cached is not None:
            row["output"], row["cached"] = cached, True
        else:
            todo.append((len(rows) - 1, prompt, key))
    t0 = time.perf_counter()
    if todo:
        outputs = run.handle.generate([p for _, p, _ in todo], decode, progress=run.progress,
                                      desc=f"{run.name}/{task.name}/{mode.name}")
        if len(outputs) != len(todo):
            raise MMTuneError(f"generation returned {len(outputs)} outputs for {len(todo)} prompts")
        new: dict[str, str] = {}
        for (ri, _, key), out in zip(todo, outputs, strict=True):
            if isinstance(out, PromptSkip):
                rows[ri]["skip"] = out.reason
            else:
                rows[ri]["output"], rows[ri]["cached"] = out, False
                new[key] = out
        run.cache.add(new)
    seconds = time.perf_counter() - t0
    for row, rec in zip(rows, task.records, strict=True):
        if "output" in row:
            row["prediction"] = extract_answer(row["output"], mode, task.spec)
        row["answers"] = rec.answers
    entry = score_rows(task.spec, task.records, rows)
    entry.update({
        "mode": mode.name, "k": mode.k, "max_new_tokens": decode.max_new_tokens,
        "generated": sum(r.get("cached") is False for r in rows), "cached": sum(r.get("cached") is True for r in rows),
        "generation_seconds": round(seconds, 3),
    })
    return entry, rows


def run_eval(cfg: EvalConfig, *, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run every (model, task, mode) of `cfg`, write the outputs, return the results dict."""
    out = Path(output_dir or cfg.output_dir)
    g = cfg.generation
    validate_config(cfg)  # what loading checks, again for configs built in code
    device = resolve_device(g.device, "--device (generation.device)")
    models = model_entries(cfg)
    model_modes = {n: [parse_mode(m, cfg.k) for m in (e.modes or cfg.modes)] for n, e in models.items()}
    specs = task_specs(cfg)
    max_new = max_new_tokens_by_task(cfg, specs)

    check_outputs(
        [Out(out, "--out" if output_dir else "output_dir", "folder")],
        inputs=[*(("pool", p) for p in cfg.pool), *(("shots_from", p) for p in cfg.shots_from),
                *((f"task {s.name!r} records", s.records) for s in specs if s.records)],
        runs=[(f"model {n!r}", e.path) for n, e in models.items()],
    )
    # Tokenizers/processors load here; weights on first generation (a fully cached rerun loads none).
    handles: dict[str, EvalModel] = {}
    for n, e in models.items():
        kind = e.backend or detect_backend(e.path)
        # The eval-wide template applies to mmtune runs; HF folders keep their own chat template.
        template = e.template or (cfg.template if kind == "mmtune" else None)
        handles[n] = open_model(e.path, backend=kind, template=template, device=device, dtype=g.dtype,
                                image_backend=e.image_backend, trust_remote_code=cfg.trust_remote_code)
    read = record_reader()
    pool = _read_all(cfg.pool, read, "pool")
    tasks = [load_task(s, pool if cfg.pool else None, pool_name=", ".join(cfg.pool) or "the pool",
                       image_root=cfg.image_root, read=read) for s in specs]
    shot_pool = _read_all(cfg.shots_from, read, "shots_from") if cfg.shots_from else pool
    if any(m.few_shot for ms in model_modes.values() for m in ms) and not shot_pool:
        raise ConfigError("few-shot modes need solved examples: give shots_from / --shots-from "
                          "(training records) or a pool")
    trained = {n: _trained_holdout(h.folder) if h.kind == "mmtune" else None for n, h in handles.items()}
    universe = [*pool, *(shot_pool if cfg.shots_from else []), *(r for t in tasks for r in t.records)]
    holdout = _resolve_holdout(cfg, trained, universe)
    split = _describe_protocol(cfg, tasks, pool, shot_pool, holdout, trained)
    write_split(split, out)
    unseen = {n: i["unseen"] for n, i in split["evaluated_tasks"].items()}
    samplers: dict[str, ShotSampler] = {}  # built on first few-shot use (a training mix can be large)

    def sampler(task: TaskData) -> ShotSampler:
        if task.name not in samplers:
            samplers[task.name] = ShotSampler(shot_pool, task.spec, holdout_tasks=holdout.tasks,
                                              holdout_clusters=holdout.clusters, seed=cfg.seed)
        return samplers[task.name]

    shots_root = cfg.shots_image_root if cfg.shots_image_root is not None else cfg.image_root

    cache = PredictionCache(out / CACHE_FILE)
    if cache.bad_lines:
        _log(f"note: {out / CACHE_FILE}: ignored {cache.bad_lines} unreadable line(s) (an interrupted write)")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    model_info: dict[str, Any] = {}
    pred_rows: list[dict[str, Any]] = []
    totals: Counter[str] = Counter()
    for mname, entry in models.items():
        handle = handles[mname]
        mrun = _ModelRun(mname, handle, handle.fingerprint(), handle.default_dtype, cache, cfg.progress)
        model_info[mname] = {**handle.info(), "fingerprint": mrun.fingerprint,
                             "trained_holdout_tasks": trained[mname]}
        results[mname] = {t.name: {} for t in tasks}
        for task in tasks:
            for mode in model_modes[mname]:
                decode = decode_settings(g, g.cot_max_new_tokens if mode.cot else max_new[task.name])
                res, rows = _evaluate(mrun, task, mode, decode, sampler(task) if mode.few_shot else None, shots_root)
                res["unseen"] = unseen[task.name]
                writer = SUBMISSION_WRITERS.get(task.spec.metric)
                if writer is not None:  # the benchmark's own submission layout (e.g. MMBench's)
                    files = writer(task.records, rows, out / "submissions" / f"{mname}__{task.name}__{mode.name}")
                    res["submission"] = [str(f) for f in files]
                results[mname][task.name][mode.name] = res
                totals.update(generated=res["generated"], cached=res["cached"])
                pred_rows.extend(rows)
        handle.release()

    report = {
        "results": results,
        "models": model_info,
        "tasks": {t.name: {**t.spec.to_dict(), **split["evaluated_tasks"][t.name]} for t in tasks},
        "unseen_tasks": split["evaluated_unseen_tasks"],
        "holdout": asdict(holdout),
        "generation": asdict(g),
        "totals": {"generated": totals["generated"], "cached": totals["cached"]},
        "output_dir": str(out),
    }
    write_outputs(report, pred_rows, out, cfg)
    return report


# --------------------------------------------------------------------------- #
# Scoring a predictions file (no model)
# --------------------------------------------------------------------------- #

def score_predictions_file(
    tasks: Sequence[TaskData], predictions: dict[str, Any], *, name: str, out: Path, source: str
) -> dict[str, Any]:
    """Score existing predictions against tasks' records; ids must match exactly.

    A prediction whose id is in no task is an error (the files do not belong
    together); a record without a prediction is a counted skip.
    """
    known = {r.id for t in tasks for r in t.records}
    stray = [i for i in predictions if i not in known]
    if stray:
        raise MMTuneError(
            f"{source}: {len(stray)} of {len(predictions)} prediction id(s) are not in the eval records "
            f"(e.g. {', '.join(repr(s) for s in stray[:3])}); are these predictions for another file?")
    results: dict[str, Any] = {name: {}}
    rows_all: list[dict[str, Any]] = []
    for t in tasks:
        rows = []
        for r in t.records:
            row: dict[str, Any] = {"model": name, "mode": "predictions", "task": t.name, "id": r.id,
                                   "answers": r.answers}
            if not r.answers:
                row["skip"] = "no reference answers"
            elif r.id not in predictions or predictions[r.id] is None:
                row["skip"] = "missing prediction"
            else:
                row["prediction"] = predictions[r.id]
            rows.append(row)
        res = score_rows(t.spec, t.records, rows)
        res.update({"mode": "predictions", "k": 0, "unseen": None})
        writer = SUBMISSION_WRITERS.get(t.spec.metric)
        if writer is not None:
            for r in rows:
                if "prediction" in r:
                    r.setdefault("output", r["prediction"])
            res["submission"] = [str(f) for f in writer(t.records, rows, out / "submissions" / f"{name}__{t.name}")]
        results[name][t.name] = {"predictions": res}
        rows_all.extend(rows)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "results": results,
        "models": {name: {"predictions": source}},
        "tasks": {t.name: {**t.spec.to_dict(), "records": len(t.records), "source": t.source} for t in tasks},
        "unseen_tasks": [],
        "output_dir": str(out),
    }
    write_outputs(report, rows_all, out, None)
    return report
