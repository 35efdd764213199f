"""`mmtune benchmark NAME SOURCE --out OUT.jsonl`: the command line of `mmtune.eval.benchmarks`.

Runs the benchmark's importer (`IMPORTERS`), writes the records and the
rejects file (`<out>.rejects.jsonl`), prints the counts and the eval command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmtune.data.schema import write_records
from mmtune.errors import MMTuneError
from mmtune.fileio import atomic_text
from mmtune.eval.benchmarks import IMPORTERS


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=list(IMPORTERS), help="which benchmark's released layout SOURCE is in")
    parser.add_argument("source", help="the released question file (MMBench TSV, TextVQA/SEED JSON) or MME folder")
    parser.add_argument("--out", required=True, help="unified records JSONL to write")
    parser.add_argument("--images-out", default=None, help="mmbench: folder for the decoded images "
                                                           "(default: next to the TSV)")
    parser.add_argument("--image-root", default=None, help="textvqa/seed: folder holding the benchmark's images")
    parser.add_argument("--ocr", default=None, help="textvqa: Rosetta OCR JSON giving ocr_tokens per image_id")
    parser.add_argument("--no-circular", action="store_true", help="mmbench: round 0 only (no CircularEval)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def cli_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MMTuneError(f"{out} exists; pass --overwrite to replace it")
    if not Path(args.source).exists():
        raise MMTuneError(f"{args.source}: not found")
    res = IMPORTERS[args.benchmark](args.source, images_out=args.images_out, image_root=args.image_root,
                                    ocr=args.ocr, circular=not args.no_circular)
    if not res.records:
        raise MMTuneError(f"{args.source}: no usable {args.benchmark} question "
                          f"({len(res.rejects)} rejected: {res.rejects[0]['reason'] if res.rejects else 'empty'})")
    n = write_records(res.records, out)
    rejects = out.with_name(out.stem + ".rejects.jsonl")
    if res.rejects:
        with atomic_text(rejects) as fh:
            for r in res.rejects:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{args.benchmark}: wrote {n} record(s) to {out}"
          + (f"; {len(res.rejects)} rejected (see {rejects})" if res.rejects else "")
          + "".join(f"; left out {c}: {reason}" for reason, c in res.left_out.items()))
    preset = {"mme": "mme", "mmbench": "mmbench", "textvqa": "textvqa", "seed": "seed"}[args.benchmark]
    print(f"evaluate with: mmtune eval MODEL --records {out} --preset {preset}")
    return 0
