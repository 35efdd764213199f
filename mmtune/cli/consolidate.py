"""`mmtune consolidate RUN_OR_CHECKPOINT [--out DIR]`: the command line of `mmtune.model.consolidate`."""

from __future__ import annotations

import argparse

from mmtune.model.consolidate import consolidate


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="a sharded checkpoint folder, or a run folder (its latest checkpoint)")
    parser.add_argument("--out", metavar="DIR", help="where to write the model (default: CHECKPOINT-consolidated)")


def cli_main(args: argparse.Namespace) -> int:
    target = consolidate(args.checkpoint, args.out)
    print(f"mmtune consolidate: wrote {target} (safetensors); use it with export / generate / eval")
    return 0
