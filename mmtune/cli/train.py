"""`mmtune train CONFIG.yaml [--output-dir DIR] [--max-steps N] [--resume-from latest|PATH] [key.sub=value ...]`.

The command line of `mmtune.train.run`: loads the config with the overrides
(strictly, "did you mean"), lets the three flags win over the config's
`train.*` fields, runs `train`, and says how it ended. Flags and overrides
come in any order after CONFIG.yaml (`mmtune.cli.anyorder`). Exit codes: 0
done, 143 (`EXIT_STOPPED`) stopped by a signal with a checkpoint saved.
"""

from __future__ import annotations

import argparse
import os
import sys

from mmtune.cli.anyorder import add_options_and_overrides, sort_out_remainder
from mmtune.config import RunConfig, load_config
from mmtune.train.run import EXIT_STOPPED, train


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", metavar="DIR", help="run folder (train.output_dir)")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (train.max_steps)")
    p.add_argument("--resume-from", metavar="latest|PATH",
                   help="continue from DIR's latest checkpoint or a checkpoint folder (train.resume_from)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the run already in DIR (kept aside until the new run saves)")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml", help="run config (see configs/tiny_mllm.yaml)")
    add_options_and_overrides(parser, _add_options,
                              overrides_help="config overrides, e.g. train.lr=1e-4 data.max_length=1024")


def cli_main(args: argparse.Namespace) -> int:
    sort_out_remainder(args, _add_options, "mmtune train")
    cfg = load_config(args.config, RunConfig, args.overrides)
    if args.output_dir is not None:
        cfg.train.output_dir = args.output_dir
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    if args.resume_from is not None:
        cfg.train.resume_from = args.resume_from
    result = train(cfg, overwrite=bool(args.overwrite))
    if result.stopped_by:
        print(f"mmtune train: stopped by {result.stopped_by} at step {result.step}/{result.total_steps}; "
              f"checkpoint {result.last_checkpoint}; continue with --resume-from latest", file=sys.stderr)
        return EXIT_STOPPED
    if int(os.environ.get("RANK", "0")) == 0:
        loss = f", last loss {result.last_loss:.4f}" if result.last_loss is not None else ""
        print(f"mmtune train: done, step {result.step}/{result.total_steps}{loss}; checkpoint {result.last_checkpoint}")
    return 0
