"""The `mmtune` command line: the only place that parses arguments.

Contract: one module per subcommand, `mmtune/cli/<command>.py`, holding that
command's argparse (`add_cli_arguments(parser)`) and its `cli_main(args) -> int`,
which turns the parsed flags into the plain arguments or config objects a
library function takes and prints what the user reads. Library modules never
import argparse (`tests/test_architecture.py` fails if one does). This file
only maps names to those modules and imports the one that is asked for, so
`mmtune --help` stays fast (torch and friends are slow to load). The
any-order flag / `key=value` override parsing is `mmtune.cli.anyorder`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("mmtune.cli.convert", "import Alpaca/Dolly/ShareGPT/LLaVA/messages/VQA files into unified JSONL"),
    "shard": ("mmtune.cli.shard", "write unified records (and their images) as webdataset tar shards"),
    "select": ("mmtune.cli.select", "condense a pool to k records (random, longest, quality, kmeans, facility, qdit, deita, dedup)"),
    "train": ("mmtune.cli.train", "train an LLM or LLaVA-style MLLM from a YAML config (align / instruct stages)"),
    "eval": ("mmtune.cli.eval", "evaluate zero-shot / few-shot on (unseen) VQA-style tasks"),
    "analyze": ("mmtune.cli.analyze", "base vs tuned: token-shift, knowledge consistency, order-swapped judge"),
    "benchmark": ("mmtune.cli.benchmark", "import MME / MMBench / TextVQA / SEED-Bench question files as eval records"),
    "generate": ("mmtune.cli.generate", "generate answers from a checkpoint, text-only or with images"),
    "consolidate": ("mmtune.cli.consolidate", "write a sharded (FSDP) checkpoint as ordinary safetensors"),
    "export": ("mmtune.cli.export", "export a checkpoint to Hugging Face (hf-llava or hf) format"),
    "demo": ("mmtune.cli.demo", "the whole pipeline on an embedded pool, on one CPU, in minutes"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from mmtune import __version__

    parser = argparse.ArgumentParser(
        prog="mmtune",
        description="Instruction tuning for LLMs and LLaVA-style multimodal LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"mmtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen subcommand's module is imported (torch and friends are slow to load).
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_cli_arguments(p)
            p.set_defaults(_module=module)
    return parser


def _process_tag() -> str:
    """`[rank N] ` in a run of several processes (the launchers set RANK / WORLD_SIZE), else nothing."""
    try:
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        several = False
    return f"[rank {os.environ.get('RANK', '?')}] " if several else ""


def main(argv: list[str] | None = None) -> int:
    from mmtune.errors import MMTuneError

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(importlib.import_module(args._module).cli_main(args) or 0)
    except MMTuneError as exc:
        # One write per line: under torchrun / accelerate launch every process prints to the same stream,
        # and print's separate write of the newline let two processes' errors run into one line.
        sys.stderr.write(f"mmtune {args.command}: error: {_process_tag()}{exc}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print(f"mmtune {args.command}: interrupted", file=sys.stderr)
        return 130
