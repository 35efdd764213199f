"""`mmtune eval CONFIG.yaml | MODEL --records ... | --predictions ...`: the command line of `mmtune.eval.run`.

Three forms, each turned into what the library takes: an eval config
(loaded with its `key=value` overrides, then the flags win: batch size,
max_new_tokens over every task's own, seed, device, dtype, template, ...)
-> `run_eval`; a model folder with `--records` files (one task per `task`
name in a file) -> an `EvalConfig` -> `run_eval`; `--predictions` with
`--records` -> `score_predictions_file`. Flags and overrides come in any order
after the target (`mmtune.cli.anyorder`). Prints the results table and what
was written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mmtune.cli.anyorder import add_options_and_overrides, sort_out_remainder
from mmtune.config import EvalConfig
from mmtune.data.schema import read_records
from mmtune.device import resolve_device
from mmtune.errors import MMTuneError
from mmtune.eval.eval_config import load_eval_config
from mmtune.eval.metrics import SCORERS
from mmtune.eval.report import PREDICTIONS_FILE, RESULTS_FILE, format_table
from mmtune.eval.run import record_reader, run_eval, score_predictions_file
from mmtune.eval.scoring import read_predictions
from mmtune.eval.tasks import load_task, resolve_task
from mmtune.outputs import Out, check_outputs

# The prompt style `--metric` implies when `--prompt` is not given.
DEFAULT_PROMPT = {"vqa": "short_answer", "exact_match": "short_answer", "pope": "short_answer", "mme": "short_answer",
                  "multiple_choice": "multiple_choice", "mmbench_circular": "multiple_choice", "seed": "multiple_choice"}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?",
                        help="an eval config (.yaml), or a saved model / checkpoint / run folder to evaluate "
                             "on --records (leave out with --predictions)")
    add_options_and_overrides(parser, _add_options,
                              overrides_help="config overrides, e.g. generation.batch_size=8 k=2 (with a config)")


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


def cli_main(args: argparse.Namespace) -> int:
    sort_out_remainder(args, _add_options, "mmtune eval")
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

