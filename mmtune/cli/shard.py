"""`mmtune shard RECORDS... --out DIR`: the command line of `mmtune.data.shards`.

Runs `write_shards`, prints one line per shard and the summary; exit 1 under
`--strict` when any record was rejected.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmtune.data.shards import parse_size, write_shards


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("records", nargs="+", metavar="RECORDS.jsonl",
                        help="unified-record JSONL file(s), or parquet / arrow files and datasets.save_to_disk "
                             "folders (read as `mmtune convert` does; embedded images stored byte for byte)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for shard-NNNNNN.tar, index.json, rejects")
    parser.add_argument("--max-count", type=int, default=10000, metavar="N", help="records per shard at most (default 10000)")
    parser.add_argument("--max-size", default="1GB", metavar="BYTES",
                        help="close a shard once it reaches this size: bytes or 500MB / 2G (default 1GB)")
    parser.add_argument("--image-root", metavar="DIR", help="folder relative image paths start from (default: current folder)")
    parser.add_argument("--rejects", metavar="PATH", help="where unwritable records go (default: DIR/rejects.jsonl)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in DIR")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any record is rejected")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: on a terminal only)")


def cli_main(args: argparse.Namespace) -> int:
    summary = write_shards(
        args.records, args.out, max_count=args.max_count, max_size=parse_size(args.max_size),
        image_root=args.image_root, rejects_path=args.rejects, overwrite=args.overwrite, progress=args.progress,
    )
    for name, count, size in summary.shards:
        print(f"{Path(args.out) / name}: {count} records, {size / 1e6:.2f} MB")
    print(summary.describe())
    if args.strict and summary.rejects:
        print(f"mmtune shard: --strict: first reject: {summary.first_reject}", file=sys.stderr)
        return 1
    return 0
