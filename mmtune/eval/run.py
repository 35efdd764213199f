"""`mmtune eval`: zero-shot / few-shot / chain-of-thought evaluation of one or more models.

One eval config lists models (name -> saved model, checkpoint or run folder),
tasks (presets from `mmtune/tasks/` or inline definitions, see
`mmtune.eval.tasks`), modes and generation settings, so "base model, k-shot"
and "tuned model, zero-shot" land in one table:

    mmtune eval configs/eval/unseen_tasks.yaml
    mmtune eval runs/tuned --records eval.jsonl --metric vqa --mode zero-shot --mode few-shot \\
        --k 4 --shots-from train.jsonl --out runs/eval
    mmtune eval --predictions answers.jsonl --records eval.jsonl --metric vqa   # score a file

Protocol. Held-out (unseen) tasks are named by task or cluster
(`holdout_tasks`, `holdout_clusters`; by default the `data.holdout_tasks` of
the models' training configs). Held-out records never serve as few-shot
examples, so an unseen task's k examples come from the training tasks. The
split is written to `split.json` and every result says whether its task was
unseen.

Generation is batched, left-padded and KV-cached (`generate_prompts`, on
the decoding core `mmtune.eval.generate.generate_tokenized` that
`generate_answers` uses too; `generate_answers` prompts with a record's turns
up to its *first* assistant turn and so cannot carry solved examples).
Greedy by default. Every output is cached in
`OUT/cache.jsonl` under a key of (model fingerprint, task, record id, prompt
text + images, generation settings), so a rerun only generates what is new.

Outputs in OUT: `results.json` (per model, task and mode: score, counted,
skipped and why, metric details), `predictions.jsonl` (one line per model,
mode, task and record: prompt, raw output, prediction, score or skip
reason), `split.json`, `results.png` (tasks x modes per model),
`eval_config.yaml`; a results table is printed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from mmtune import runs
# The eval config lives with the others in mmtune.config; importable from here as before.
from mmtune.config import (  # noqa: F401
    ConfigError,
    EvalConfig,
    GenerationSettings,
    ModelEntry,
    from_dict,
    load_config,
    validate_config,
)
from mmtune.data.schema import Record, read_records
from mmtune.device import resolve_device
from mmtune.errors import MMTuneError

# The model backends (mmtune checkpoints, llava-hf folders, causal LMs) live in mmtune.eval.backends;
# generate_prompts and fingerprint_model stay importable from here.
from mmtune.eval.backends import (  # noqa: F401
    EvalModel,
    detect_backend,
    fingerprint_model,
    generate_prompts,
    open_model,
)
from mmtune.eval.benchmarks import SUBMISSION_WRITERS
from mmtune.eval.generate import PromptSkip
from mmtune.eval.metrics import SCORERS, MetricError, ScoreReport, get_scorer
from mmtune.eval.tasks import (
    Mode,
    ShotSampler,
    TaskData,
    TaskError,
    TaskSpec,
    build_prompt,
    describe_split,
    extract_answer,
    is_heldout,
    load_task,
    parse_mode,
    resolve_images,
    resolve_task,
    split_unseen,
)
from mmtune.fileio import atomic_text, write_json_atomic
from mmtune.outputs import Out, check_outputs

DEFAULT_MAX_NEW_TOKENS = 64
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.jsonl"
SPLIT_FILE = "split.json"
PLOT_FILE = "results.png"
CACHE_FILE = "cache.jsonl"
CONFIG_FILE = "eval_config.yaml"
TABLE_FILE = "results.md"


# --------------------------------------------------------------------------- #
# Config
# --------------------------------------------------------------------------- #


def load_eval_config(path: str | Path, overrides: Sequence[str] = ()) -> EvalConfig:
    return load_config(path, EvalConfig, list(overrides))


def _model_entries(cfg: EvalConfig) -> dict[str, ModelEntry]:
    if not cfg.models:
        raise ConfigError("models: list at least one model (name: path to a saved model or run folder)")
    out: dict[str, ModelEntry] = {}
    for name, value in cfg.models.items():
        entry = ModelEntry(path=str(value)) if isinstance(value, str | Path) else from_dict(
            ModelEntry, value, f"models.{name}")
        if not entry.path:
            raise ConfigError(f"models.{name}: needs a path")
        out[str(name)] = entry
    return out


# --------------------------------------------------------------------------- #
# The prediction cache
# --------------------------------------------------------------------------- #


def cache_key(fingerprint: str, task: str, record_id: str, prompt: str, images: Sequence[str],
              settings: dict[str, Any]) -> str:
    prompt_hash = hashlib.sha256("\0".join([prompt, *images]).encode()).hexdigest()
    blob = json.dumps([fingerprint, task, record_id, prompt_hash, settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class PredictionCache:
    """Raw outputs by cache key, in an append-only JSONL journal.

    Appended after every generated group, so a crashed run keeps what it had
    generated; a torn last line (from a crash mid-write) is ignored and counted.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        self.bad_lines = 0
        if path.is_file():
            from mmtune.data.textio import iter_json_lines

            for _, obj, reason, _ in iter_json_lines(path):
                try:
                    if reason is not None:
                        raise TypeError(reason)
                    self.entries[obj["key"]] = obj["output"]
                except (KeyError, TypeError):
                    self.bad_lines += 1

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def add(self, new: dict[str, str]) -> None:
        if not new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8", errors="backslashreplace") as fh:
            for key, output in new.items():
                fh.write(json.dumps({"key": key, "output": output}, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.entries.update(new)


def _trained_holdout(folder: Path) -> list[str] | None:
    """`data.holdout_tasks` from the run_config.yaml next to a checkpoint (None when there is none)."""
    if runs.read_run_config(folder) is None:
        return None
    value = runs.run_config_value(folder, "data.holdout_tasks") or []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


# --------------------------------------------------------------------------- #
# Scoring one task
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# The eval run
# --------------------------------------------------------------------------- #


def _reader() -> Callable[[Path], list[Record]]:
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


def _generation_settings(g: GenerationSettings, max_new_tokens: int, dtype: str) -> dict[str, Any]:
    s: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": g.do_sample, "dtype": dtype}
    if g.do_sample:
        s.update(temperature=g.temperature, top_p=g.top_p, seed=g.seed)
    return s


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


@dataclass
class _ModelRun:
    """One model being evaluated: its name, lazy weights, template, fingerprint, and the run's shared state."""

    name: str
    handle: EvalModel
    fingerprint: str
    dtype: str
    cache: PredictionCache
    g: GenerationSettings
    progress: bool


def _evaluate(run: _ModelRun, task: TaskData, mode: Mode, max_new_tokens: int, sampler: ShotSampler | None,
              shots_root: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One (model, task, mode): build prompts, take cached outputs, generate the rest, score.

    Returns the results entry and one prediction row per task record.
    """
    settings = _generation_settings(run.g, max_new_tokens, run.dtype)
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
        g = run.g
        outputs = run.handle.generate(
            [p for _, p, _ in todo], batch_size=g.batch_size,
            max_new_tokens=max_new_tokens, do_sample=g.do_sample, temperature=g.temperature, top_p=g.top_p,
            seed=g.seed if g.do_sample else None, progress=run.progress, desc=f"{run.name}/{task.name}/{mode.name}",
        )
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
        "mode": mode.name, "k": mode.k, "max_new_tokens": max_new_tokens,
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
    models = _model_entries(cfg)
    model_modes = {n: [parse_mode(m, cfg.k) for m in (e.modes or cfg.modes)] for n, e in models.items()}
    if not cfg.tasks:
        raise ConfigError("tasks: list at least one task (a preset name or a mapping, see docs/eval.md)")
    specs = [resolve_task(t, f"tasks[{i}]") for i, t in enumerate(cfg.tasks)]
    twice = [n for n, c in Counter(s.name for s in specs).items() if c > 1]
    if twice:
        raise TaskError(f"task name {twice[0]!r} is used twice; give each task its own name")
    # Precedence: the task's own config entry > generation.max_new_tokens > the task preset > 64.
    max_new = {s.name: (t["max_new_tokens"] if isinstance(t, dict) and t.get("max_new_tokens") is not None
                        else g.max_new_tokens or s.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
               for s, t in zip(specs, cfg.tasks, strict=True)}

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
    read = _reader()
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
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(split, out / SPLIT_FILE)
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
        mrun = _ModelRun(mname, handle, handle.fingerprint(), handle.default_dtype, cache, g, cfg.progress)
        model_info[mname] = {**handle.info(), "fingerprint": mrun.fingerprint,
                             "trained_holdout_tasks": trained[mname]}
        results[mname] = {t.name: {} for t in tasks}
        for task in tasks:
            for mode in model_modes[mname]:
                n_new = g.cot_max_new_tokens if mode.cot else max_new[task.name]
                res, rows = _evaluate(mrun, task, mode, n_new, sampler(task) if mode.few_shot else None, shots_root)
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
    _write_outputs(report, pred_rows, out, cfg)
    return report


def _write_outputs(report: dict[str, Any], rows: list[dict[str, Any]], out: Path, cfg: EvalConfig | None) -> None:
    import yaml

    order = ["model", "mode", "task", "id", "prompt", "images", "shots", "output", "prediction", "answers",
             "score", "skip", "cached"]
    with atomic_text(out / PREDICTIONS_FILE) as fh:
        for row in rows:
            line = {k: row[k] for k in order if k in row}
            line.update({k: v for k, v in row.items() if k not in line})
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    write_json_atomic(report, out / RESULTS_FILE)
    md = out / (TABLE_FILE + ".tmp")
    md.write_text(markdown_table(report), encoding="utf-8")
    os.replace(md, out / TABLE_FILE)
    if cfg is not None:
        with atomic_text(out / CONFIG_FILE) as fh:
            fh.write(yaml.safe_dump(asdict(cfg), sort_keys=False))
    if cfg is None or cfg.plot:
        from mmtune.eval.plots import plot_results

        report["plot"] = str(plot_results(report, out / PLOT_FILE))


# --------------------------------------------------------------------------- #
# Scoring a predictions file (no model)
# --------------------------------------------------------------------------- #

PREDICTION_ID_KEYS = ("id", "question_id")
PREDICTION_TEXT_KEYS = ("prediction", "text", "answer")


def read_predictions(path: str | Path) -> dict[str, Any]:
    """id -> prediction from JSONL: mmtune's (`id`, `prediction`) or LLaVA's answers file (`question_id`, `text`).

    A line without an id, a duplicated id or bad JSON is an error naming the
    line; a line without a prediction field maps to None (a counted skip).
    """
    from mmtune.data.schema import iter_jsonl

    path = Path(path)
    if not path.is_file():
        raise MMTuneError(f"--predictions: {path} not found")
    out: dict[str, Any] = {}
    for line, obj in iter_jsonl(path):
        if isinstance(obj, Exception):
            raise obj
        if not isinstance(obj, dict):
            raise MMTuneError(f"{path}:{line}: expected a JSON object")
        rid = next((obj[k] for k in PREDICTION_ID_KEYS if obj.get(k) is not None), None)
        if rid is None:
            raise MMTuneError(f"{path}:{line}: no id (one of {', '.join(PREDICTION_ID_KEYS)})")
        rid = str(rid)
        if rid in out:
            raise MMTuneError(f"{path}:{line}: id {rid!r} appears twice")
        out[rid] = next((obj[k] for k in PREDICTION_TEXT_KEYS if k in obj), None)
    return out


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
    _write_outputs(report, rows_all, out, None)
    return report


# --------------------------------------------------------------------------- #
# The results table
# --------------------------------------------------------------------------- #


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
                row.append(f"{official_cell(e)} ({e['counted']}/{e['total']})")
        body.append(row)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = ["score in % or the benchmark's official figure (counted/total records; the rest were skipped, "
             "see results.json)"]
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
                             f"{official_cell(e)} ({e['counted']}/{e['total']}, {e['skipped']} skipped)")
            lines.append("| " + " | ".join(cells) + " |")
    metrics = {t: next((e["metric"] for per_task in results.values() for e in per_task.get(t, {}).values()), "")
               for t in tasks}
    notes = ["", "Cells: official metric (counted/total records, skipped); see results.json for skip reasons.",
             "Metrics: " + ", ".join(f"{t} = {m}" for t, m in metrics.items()) + "."]
    models = report.get("models") or {}
    if models:
        notes.append("Models: " + "; ".join(
            f"{n} = {i.get('path', i.get('predictions', ''))} ({i.get('backend', 'predictions file')})"
            for n, i in models.items()) + ".")
    return "\n".join(lines + notes) + "\n"


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #

DEFAULT_PROMPT = {"vqa": "short_answer", "exact_match": "short_answer", "pope": "short_answer", "mme": "short_answer",
                  "multiple_choice": "multiple_choice", "mmbench_circular": "multiple_choice", "seed": "multiple_choice"}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?",
                        help="an eval config (.yaml), or a saved model / checkpoint / run folder to evaluate "
                             "on --records (leave out with --predictions)")
    _add_options(parser)
    # REMAINDER so that overrides and options may come in any order after the target; cli_main sorts them out.
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key.sub=value",
                        help="config overrides, e.g. generation.batch_size=8 k=2 (with a config)")


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", action="append", default=[],
                        help="eval records (unified JSONL with answers); one task per `task` name in it")
    parser.add_argument("--metric", choices=list(SCORERS), default=None)
    parser.add_argument("--preset", default=None, help="a task preset (vqav2, gqa, scienceqa, pope, mme, mmbench, textvqa, seed) "
                             "for metric/prompt")
    parser.add_argument("--prompt", choices=["short_answer", "multiple_choice", "free"], default=None,
                        help="prompt style (default: by metric)")
    parser.add_argument("--suffix", default=None, help="instruction suffix replacing the prompt style's")
    parser.add_argument("--vqa-rule", choices=["evalai", "vqa-github"], default="evalai")
    parser.add_argument("--mode", action="append", default=[],
                        help="zero-shot, few-shot, K-shot (e.g. 2-shot) or cot; repeat for several (default zero-shot)")
    parser.add_argument("--k", type=int, default=4, help="examples for mode few-shot (default 4)")
    parser.add_argument("--shots-from", action="append", default=[],
                        help="training records to draw few-shot examples from")
    parser.add_argument("--holdout-tasks", default=None,
                        help="comma-separated unseen tasks (default: the checkpoint's training data.holdout_tasks)")
    parser.add_argument("--holdout-clusters", default="", help="comma-separated unseen task clusters (meta.cluster)")
    parser.add_argument("--image-root", default=None, help="folder for relative image paths in --records")
    parser.add_argument("--name", default=None, help="the model's name in the results (default: model)")
    parser.add_argument("--template", default=None, help="prompt template (default: the one the model trained with)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N records of each task")
    parser.add_argument("--out", default=None, help="output folder (default: runs/eval, or the config's output_dir)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None, help="few-shot example choice (and sampling) seed")
    parser.add_argument("--device", default=None)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a checkpoint's own tokenizer/model code to run (only for sources you trust)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--predictions", default=None,
                        help="score this predictions JSONL (id/question_id + prediction/text) instead of generating")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-plot", action="store_true")


def _split_list(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _tasks_from_records(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One task entry per distinct `task` in each --records file."""
    if not args.records:
        raise MMTuneError("give --records EVAL.jsonl (or an eval config)")
    if not args.metric and not args.preset:
        raise MMTuneError(f"give --metric ({', '.join(SCORERS)}) or --preset")
    base: dict[str, Any] = {}
    if args.preset:
        base["preset"] = args.preset
    if args.metric:
        base["metric"] = args.metric
        base["prompt"] = args.prompt or DEFAULT_PROMPT[args.metric]
    elif args.prompt:
        base["prompt"] = args.prompt
    if args.suffix is not None:
        base["suffix"] = args.suffix.encode().decode("unicode_escape")
    base["vqa_rule"] = args.vqa_rule
    if args.max_new_tokens is not None:
        base["max_new_tokens"] = args.max_new_tokens
    if args.limit is not None:
        base["limit"] = args.limit
    if args.image_root is not None:
        base["image_root"] = args.image_root
    entries: list[dict[str, Any]] = []
    for path in args.records:
        if not Path(path).is_file():
            raise MMTuneError(f"--records: {path} not found")
        names = list(dict.fromkeys(r.task for r in read_records(path)))
        if len(names) <= 1:
            entries.append({**base, "name": names[0] if names and names[0] else Path(path).stem, "records": path})
        elif None in names:
            raise MMTuneError(f"{path}: some records have a `task` and some do not; give every record a task")
        else:
            entries.extend({**base, "name": n, "records": path, "select_tasks": [n]} for n in names)
    return entries


def _merge_remainder(args: argparse.Namespace) -> None:
    """Parse options that came after the target (argparse's REMAINDER) into `args`."""
    inner = argparse.ArgumentParser(prog="mmtune eval", add_help=False)
    _add_options(inner)
    inner.add_argument("overrides", nargs="*")
    rest = inner.parse_intermixed_args(list(args.overrides or []))
    defaults = vars(inner.parse_args([]))
    for key, value in vars(rest).items():
        if key == "overrides":
            args.overrides = value
        elif isinstance(value, list):
            setattr(args, key, list(getattr(args, key) or []) + value)
        elif value != defaults[key]:
            setattr(args, key, value)


def cli_main(args: argparse.Namespace) -> int:
    _merge_remainder(args)
    if args.device is not None:
        args.device = resolve_device(args.device)  # before any work: a bad --device is one line
    target = args.target
    if args.predictions:
        if target:
            raise MMTuneError("--predictions scores a file; leave out the model/config argument")
        out = Path(args.out or "runs/eval")
        check_outputs([Out(out, "--out", "folder")],
                      inputs=[("--predictions", args.predictions), *(("--records", r) for r in args.records)])
        specs = [resolve_task(e, f"task {e['name']!r}") for e in _tasks_from_records(args)]
        read = _reader()
        tasks = [load_task(s, read=read) for s in specs]
        report = score_predictions_file(tasks, read_predictions(args.predictions), name=args.name or "predictions",
                                        out=out, source=args.predictions)
    elif target and Path(target).suffix.lower() in (".yaml", ".yml") and Path(target).is_file():
        cfg = load_eval_config(target, args.overrides)
        if args.records:
            raise MMTuneError("--records goes with a checkpoint; with a config, list tasks in the config")
        _apply_cli_to_config(cfg, args)
        report = run_eval(cfg, output_dir=args.out)
    elif target:
        if args.overrides:
            raise MMTuneError(f"unexpected argument(s) {' '.join(args.overrides)} (overrides need a config file)")
        if not Path(target).exists():
            raise MMTuneError(f"{target}: no such eval config, checkpoint or run folder")
        cfg = EvalConfig(
            models={args.name or "model": {"path": target, "template": args.template}},
            tasks=_tasks_from_records(args),
            holdout_tasks=_split_list(args.holdout_tasks) if args.holdout_tasks is not None else None,
            holdout_clusters=_split_list(args.holdout_clusters),
            shots_from=list(args.shots_from),
            modes=list(args.mode) or ["zero-shot"],
            k=args.k,
            output_dir=args.out or "runs/eval",
        )
        _apply_cli_to_config(cfg, args)
        report = run_eval(cfg)
    else:
        raise MMTuneError("give an eval config, a checkpoint with --records, or --predictions with --records")
    print(format_table(report))
    out = Path(report["output_dir"])
    print(f"wrote {out / RESULTS_FILE}, {out / PREDICTIONS_FILE}"
          + (f", {report['plot']}" if report.get("plot") else "")
          + (f" ({report['totals'].get('generated', 0)} generated, {report['totals'].get('cached', 0)} cached)"
             if "totals" in report else ""))
    return 0


def _apply_cli_to_config(cfg: EvalConfig, args: argparse.Namespace) -> None:
    g = cfg.generation
    if args.batch_size is not None:
        g.batch_size = args.batch_size
    if args.max_new_tokens is not None:  # on the command line it wins over every task's own setting
        g.max_new_tokens = g.cot_max_new_tokens = args.max_new_tokens
        cfg.tasks = [{**({"preset": t} if isinstance(t, str) else t), "max_new_tokens": args.max_new_tokens}
                     for t in cfg.tasks]
    if args.seed is not None:
        cfg.seed = g.seed = args.seed
    if args.device is not None:
        g.device = args.device
    if args.trust_remote_code:
        cfg.trust_remote_code = True
    if args.dtype is not None:
        g.dtype = args.dtype
    if args.no_progress:
        cfg.progress = False
    if args.no_plot:
        cfg.plot = False
    if args.template is not None:
        cfg.template = args.template

