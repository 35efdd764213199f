"""`mmtune demo [--out DIR] [--minutes M] [--bases DIR]`: the command line of `mmtune.demo`.

An existing, non-empty DIR is replaced only with `--overwrite`, and then kept
aside (not deleted) until the new demo is complete; it is put back if the run
fails or is interrupted. `run_demo` is looked up when the command runs (not
bound at import), so a test can stand in for it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from mmtune import demo
from mmtune.errors import MMTuneError


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--minutes", type=float, default=demo.FULL_MINUTES,
                        help="time budget in minutes on a 2-core CPU; scales pool, steps and eval (default 15)")
    parser.add_argument("--k", type=int, default=1000, help="records to select (default 1000)")
    parser.add_argument("--compare-random", action=argparse.BooleanOptionalAction, default=None,
                        help="also train on a random k with the same steps and seeds and evaluate it "
                             "(default: on when --minutes >= 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bases", default=None, metavar="DIR",
                        help="start from the bases in DIR (lm/ and clip/, as scripts/pretrain_demo_bases.py writes) "
                             "instead of the shipped ones")
    parser.add_argument("--overwrite", action="store_true", help="delete OUT first if it exists")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def cli_main(args: argparse.Namespace) -> int:
    from mmtune.fileio import temp_sibling
    from mmtune.outputs import Out, check_outputs

    out = Path(args.out)
    check_outputs([Out(out, "--out", "folder", whole=True)])
    previous = None
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise MMTuneError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
        # Kept aside, not deleted, until the new demo is complete; put back if it fails.
        previous = temp_sibling(out, "previous")
        os.replace(out, previous)
    try:
        demo.run_demo(out, minutes=args.minutes, k=args.k, compare_random=args.compare_random, seed=args.seed,
                      bases=args.bases, progress=args.progress and sys.stderr.isatty())
    except BaseException:
        if previous is not None:
            shutil.rmtree(out, ignore_errors=True)
            os.replace(previous, out)
            print(f"mmtune demo: the previous {out} is back as it was", file=sys.stderr)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return 0
