"""`mmtune convert IN... --out OUT.jsonl`: the command line of `mmtune.data.convert`.

Checks the outputs before any work (nothing a user owns is overwritten), runs
`convert_files`, writes the records, prints a line per input and the counts;
exit 1 under `--strict` when any row was rejected.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmtune.data.convert import convert_files, default_images_dir, default_rejects_path, expand_inputs
from mmtune.data.formats import FORMATS
from mmtune.data.schema import write_records
from mmtune.outputs import Out, check_outputs


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IN",
                        help="input files (.json / .jsonl / .parquet / .arrow), datasets.save_to_disk folders, "
                             "or folders of files")
    parser.add_argument("--out", required=True, metavar="OUT.jsonl", help="unified JSONL to write (atomically)")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="input layout (default: detected per file)")
    parser.add_argument("--image-root", metavar="DIR", help="folder relative image paths start from (default: each input's folder)")
    parser.add_argument("--rejects", metavar="PATH", help="where rejected rows go (default: OUT with .rejects.jsonl)")
    parser.add_argument("--images-dir", metavar="DIR",
                        help="where images embedded as bytes (parquet / arrow / datasets) are written, unchanged "
                             "(default: OUT's name with _images, next to it)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any row is rejected")
    parser.add_argument("--source", metavar="NAME", help="set every record's source (default: the format's or the file's name)")
    parser.add_argument("--task", metavar="NAME", help="set every record's task (default: the row's own, e.g. Dolly category)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: on a terminal only)")


def cli_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    rejects = Path(args.rejects) if args.rejects else default_rejects_path(out)
    inputs = expand_inputs(args.inputs)
    images_dir = Path(args.images_dir) if args.images_dir else default_images_dir(out)
    check_outputs(
        [Out(out, "--out"), Out(rejects, "--rejects" if args.rejects else "--rejects (default)"),
         Out(images_dir, "--images-dir" if args.images_dir else "--images-dir (default)", "folder")],
        inputs=[("input", p) for p in inputs],
    )
    result = convert_files(
        inputs, args.format, args.image_root, source=args.source, task=args.task,
        rejects_path=rejects, progress=args.progress, images_dir=images_dir,
    )
    for path, fmt in result.formats.items():
        if path in result.rows_per_input:
            print(f"{path}: {fmt}, {result.rows_per_input[path]} rows")
        else:
            print(f"{path}: {fmt} annotations (joined to the questions)")
    write_records(result.records, out)
    print(f"converted {len(result.records)}, rejected {result.rejects_count}")
    if result.url_images:
        print(f"{result.url_images} image URL(s) kept as they are, not checked (offline)")
    if result.embedded_images:
        print(f"{result.embedded_images} embedded image(s) written unchanged to {images_dir}")
    print(f"wrote {out}" + (f"; rejects in {rejects}" if result.rejects else ""))
    if args.strict and result.rejects:
        print(f"mmtune convert: --strict: first reject: {result.first_reject}", file=sys.stderr)
        return 1
    return 0
