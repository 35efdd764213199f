"""`mmtune export CHECKPOINT --out DIR`: the command line of `mmtune.model.export`.

Runs `export_checkpoint`, prints what was written and how to load it with
transformers (stderr), and the output folder as the last stdout line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from mmtune.model.export import FORMATS, ExportResult, export_checkpoint


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a saved model / checkpoint folder, or a run folder (latest checkpoint-*)")
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="hf-llava: LlavaForConditionalGeneration + LlavaProcessor (MLLM); hf: AutoModelForCausalLM + "
        "tokenizer (LLM). Default: by the checkpoint's model.mode",
    )
    parser.add_argument(
        "--template", default=None, help="chat template to ship (default: data.template the run trained with)"
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="cast weights (default: the LM's)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the checkpoint's own tokenizer/model code to run (only for sources you trust)")


def cli_main(args: argparse.Namespace) -> int:
    result = export_checkpoint(
        args.checkpoint, args.out, fmt=args.format, template=args.template, dtype=args.dtype, overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
    )
    print(
        f"exported {args.checkpoint} as {result.format} (template {result.template}, "
        f"{result.num_parameters:,} parameters) to {result.out}",
        file=sys.stderr,
    )
    for line in _usage(result):
        print(line, file=sys.stderr)
    print(result.out)
    return 0


def _usage(result: ExportResult) -> Iterable[str]:
    if result.format == "hf-llava":
        yield "  from transformers import AutoProcessor, LlavaForConditionalGeneration"
        yield f"  model = LlavaForConditionalGeneration.from_pretrained({str(result.out)!r})"
        yield f"  processor = AutoProcessor.from_pretrained({str(result.out)!r}, backend={result.image_backend!r})"
    else:
        yield "  from transformers import AutoModelForCausalLM, AutoTokenizer"
        yield f"  model = AutoModelForCausalLM.from_pretrained({str(result.out)!r})"
        yield f"  tokenizer = AutoTokenizer.from_pretrained({str(result.out)!r})"
