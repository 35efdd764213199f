"""`mmtune generate CHECKPOINT --prompt TEXT [--image FILE]` or `--input PROMPTS.jsonl --out ANSWERS.jsonl`.

The command line of `mmtune.eval.generate`: checks every flag before the
model loads (one-line errors naming the flag), picks the template
(`pick_template`), loads the model and runs `generate_answers` (one answer,
printed as the last stdout line) or `generate_file` (a batch, one line per
input line, in order).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmtune.data.images import is_url
from mmtune.data.schema import IMAGE_PLACEHOLDER, Record
from mmtune.device import resolve_device
from mmtune.errors import MMTuneError
from mmtune.eval.generate import check_batch_size, generate_answers, generate_file, pick_template
from mmtune.outputs import Out, check_outputs
from mmtune.runs import RUN_CONFIG_FILE, resolve_model_folder


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a saved model / checkpoint folder, or a run folder (latest checkpoint-*)")
    parser.add_argument("--prompt", help="the user's message (one answer, printed)")
    parser.add_argument("--input", metavar="PROMPTS.jsonl",
                        help='a batch: unified records or {"prompt", "image"} lines (needs --out)')
    parser.add_argument("--out", metavar="ANSWERS.jsonl", help='with --input: one {"id", "answer"} line per input line')
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together with --input (default 8)")
    parser.add_argument("--image-root", help="with --input: where relative image paths start (default: its folder)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bar with --input (default on)")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        help="an image file (repeat for several); '<image>\\n' is put before the prompt for each "
        "unless the prompt has its own <image> placeholders",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--template", default=None, help="prompt template (default: the one the run trained with)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the checkpoint's own tokenizer/model code to run (only for sources you trust)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="LM dtype (default: the model config's)",
    )


def cli_main(args: argparse.Namespace) -> int:
    from mmtune.model.io import load_model

    if (args.prompt is None) == (args.input is None):
        raise MMTuneError("give either --prompt (one answer, printed) or --input FILE --out FILE (a batch)")
    args.device = resolve_device(args.device)  # before any work: a bad --device is one line
    if args.input is not None:
        return _cli_batch(args)

    if args.max_new_tokens < 1:
        raise MMTuneError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.do_sample and (args.temperature <= 0 or not 0 < args.top_p <= 1):
        raise MMTuneError("--temperature must be > 0 and --top-p in (0, 1] when sampling")
    ckpt = resolve_model_folder(args.checkpoint)
    template, fallback = pick_template(ckpt, args.template)  # an unknown name fails here, before the model loads
    if fallback:
        print(f"no {RUN_CONFIG_FILE} with data.template next to {ckpt}; using template {template}", file=sys.stderr)
    images = [_check_image_arg(p) for p in args.image]
    content = args.prompt
    n_ph = content.count(IMAGE_PLACEHOLDER)
    if images and n_ph == 0:
        content = f"{IMAGE_PLACEHOLDER}\n" * len(images) + content
    elif n_ph != len(images):
        raise MMTuneError(f"--prompt has {n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} --image given")
    device = args.device
    print(f"loading {ckpt} (template {template}, device {device})", file=sys.stderr)
    bundle = load_model(ckpt, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if images and bundle.image_transform is None:
        raise MMTuneError(f"{ckpt} is a text-only model (mode llm); drop --image")
    record = Record(id="cli", messages=[{"role": "user", "content": content}], images=images)
    [answer] = generate_answers(
        bundle,
        [record],
        template,
        batch_size=1,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    print(answer)
    return 0


def _check_image_arg(path: str) -> str:
    """One --image, kept as the user wrote it (a URL is not a local path); a one-line error when unusable."""
    if is_url(path):
        raise MMTuneError(f"--image {path}: is a URL; mmtune never downloads: save the image and pass its file")
    if Path(path).expanduser().is_dir():
        raise MMTuneError(f"--image {path}: is a folder; give one image file per --image")
    if not Path(path).expanduser().is_file():
        raise MMTuneError(f"--image {path}: file not found")
    return str(Path(path).expanduser())


def _cli_batch(args: argparse.Namespace) -> int:
    from mmtune.model.io import load_model

    if args.out is None:
        raise MMTuneError("--input needs --out ANSWERS.jsonl")
    if args.image:
        raise MMTuneError("--image goes with --prompt; with --input, name images in the input lines")
    check_batch_size(args.batch_size)
    if args.max_new_tokens < 1:
        raise MMTuneError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.do_sample and (args.temperature <= 0 or not 0 < args.top_p <= 1):
        raise MMTuneError("--temperature must be > 0 and --top-p in (0, 1] when sampling")
    inp, out = Path(args.input), Path(args.out)
    if not inp.is_file():
        raise MMTuneError(f"--input {inp}: file not found")
    ckpt = resolve_model_folder(args.checkpoint)
    check_outputs([Out(out, "--out")], inputs=[("--input", inp)], runs=[("checkpoint", ckpt)])
    template, _ = pick_template(ckpt, args.template)
    device = args.device
    print(f"loading {ckpt} (template {template}, device {device})", file=sys.stderr)
    bundle = load_model(ckpt, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    answered, errors = generate_file(
        bundle, inp, out, template, batch_size=args.batch_size, image_root=args.image_root, progress=args.progress,
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed,
    )
    print(f"answered {answered}, errors {errors}; wrote {out}")
    return 0
