"""`mmtune analyze token-shift|consistency|judge ...`: the command line of `mmtune.eval.analyze`.

Each analysis's flags fill its options dataclass (`ANALYSES`: name ->
options, runner), field for field; `--no-progress` is `progress=False`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from mmtune.errors import MMTuneError
from mmtune.eval.analyze import ANALYSES, MEASURES


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/analysis", help="output folder (default runs/analysis)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-progress", action="store_true")


def _two_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="base model: mmtune run/checkpoint, llava-hf folder or causal-LM folder")
    p.add_argument("tuned", help="tuned model (same kinds)")
    p.add_argument("--data", required=True, help="unified records JSONL")
    p.add_argument("--image-root", default=None, help="folder for relative image paths in --data")
    p.add_argument("--limit", type=int, default=None, help="use the first N records")
    p.add_argument("--base-template", default=None, help="prompt template of BASE (default: its own)")
    p.add_argument("--tuned-template", default=None, help="prompt template of TUNED (default: its own)")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    p = sub.add_parser("token-shift", help="URIAL token distribution shift of TUNED's answers under BASE")
    _two_models(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    _common(p)
    p = sub.add_parser("consistency", help="knowledge consistency of BASE and TUNED on multiple-choice records")
    _two_models(p)
    p.add_argument("--measure", choices=list(MEASURES), default="loglik",
                   help="headline measure: loglik (per-question Pearson over the choices' log-likelihoods) or "
                        "correctness (Pearson over items of per-item correctness)")
    p.add_argument("--answer-prefix", default=" ", help="text before each choice (default one space)")
    _common(p)
    p = sub.add_parser("judge", help="pairwise judging of two answers files by a local model, both orders")
    p.add_argument("a", help="answers A (JSONL: id/question_id + prediction/output/text/answer [+ question])")
    p.add_argument("b", help="answers B (same layout)")
    p.add_argument("--judge", required=True, help="judge model: mmtune run/checkpoint or causal-LM / llava-hf folder")
    p.add_argument("--judge-template", default=None)
    p.add_argument("--data", default=None, help="records giving each id's question (else the answers' question)")
    p.add_argument("--labels", default="A,B", help="the two single-token labels the judge answers with")
    p.add_argument("--tie-margin", type=float, default=0.0)
    _common(p)


def cli_main(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise MMTuneError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "labels", None) is not None and len(args.labels.split(",")) != 2:
        raise MMTuneError(f"--labels takes two comma-separated labels, got {args.labels!r}")
    options_type, run = ANALYSES[args.analysis]
    names = [f.name for f in dataclasses.fields(options_type) if f.name != "progress"]
    report = run(options_type(**{n: getattr(args, n) for n in names}, progress=not args.no_progress))
    name = {"token-shift": "token_shift"}.get(args.analysis, args.analysis)
    print(f"wrote {Path(args.out) / (name + '.json')}, {report['plot']}")
    return 0
