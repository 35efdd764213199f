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
protocol for a predictions file, without models.

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

import argparse
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
    load_eval_config,
    max_new_tokens_by_task,
    model_entries,
    task_specs,
)
from mmtune.eval.generate import DecodeSettings, PromptSkip
from mmtune.eval.metrics import SCORERS
from mmtune.eval.report import (
    PREDICTIONS_FILE,
    RESULTS_FILE,
    format_table,
    write_outputs,
    write_split,
)
from mmtune.eval.scoring import read_predictions, score_rows
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
    resolve_task,
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
        read = record_reader()
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

