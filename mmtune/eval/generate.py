"""Generation from a trained (or freshly built) model: batched, left-padded, KV-cached.

`generate_answers` is what evaluation calls: records (or plain prompts) in,
answer strings out, in the same order. Prompts are rendered with the
training template up to the assistant turn, image placeholders are expanded
to the model's image-token runs, rows are sorted by length and left-padded so
every row's new tokens start at the same position, and the LM decodes with
its KV cache (transformers' `generate` on the spliced embeddings).

    mmtune generate runs/tiny_mllm --image cat.png --prompt "What is this?"

prints the answer as its last stdout line (a run folder means its latest
`checkpoint-*`; the template defaults to the one the run trained with).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmtune.data.collate import pad_sequences
from mmtune.data.images import load_image, resolve_image_path
from mmtune.data.schema import IMAGE_PLACEHOLDER, Record, count_placeholders
from mmtune.data.templates import Template, get_template, prompt_messages
from mmtune.data.tokenize import stop_token_ids, tokenize_prompt
from mmtune.errors import MMTuneError
from mmtune.model.build import ModelBundle
from mmtune.model.io import checkpoint_template

DEFAULT_TEMPLATE = "vicuna_v1"


def _prompt_of(
    item: Record | str, instruction_suffix: str
) -> tuple[str, list[dict[str, str]], list[str], dict[str, Any]]:
    """(id, prompt messages, image paths, meta) of one input."""
    if isinstance(item, str):
        msgs = [{"role": "user", "content": item + instruction_suffix}]
        return "<prompt>", msgs, [], {}
    msgs = prompt_messages(item, instruction_suffix=instruction_suffix)
    n = count_placeholders(msgs)
    return item.id, msgs, list(item.images[:n]), item.meta


def _trim(text: str, stop_strings: Sequence[str]) -> str:
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


@torch.no_grad()
def generate_answers(
    bundle: ModelBundle,
    records_or_prompts: Sequence[Record | str],
    template: str | Template,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    image_root: str | Path | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    instruction_suffix: str = "",
    seed: int | None = None,
    progress: bool = False,
) -> list[str]:
    """One answer per input, in input order.

    A Record is prompted with its messages up to the first assistant turn
    (and the images those turns name, read relative to `image_root`); a str
    is one user turn, text-only. The answer is the decoded new tokens, cut at
    EOS and at the template's stop strings (e.g. "USER:" for vicuna_v1).
    """
    from tqdm.auto import tqdm

    model, tok = bundle.model, bundle.tokenizer
    tmpl = template if isinstance(template, Template) else get_template(template, tok)
    if batch_size < 1:
        raise MMTuneError(f"batch_size must be >= 1, got {batch_size}")
    # Token ids for every prompt up front (cheap, and needed to sort by length);
    # images are read batch by batch so a large eval set never sits in memory.
    prepared: list[tuple[str, list[int], list[str]]] = []
    for item in records_or_prompts:
        rid, msgs, images, meta = _prompt_of(item, instruction_suffix)
        if images and bundle.image_transform is None:
            raise MMTuneError(f"record {rid!r} has images but the model is text-only (mode llm)")
        try:
            ids = tokenize_prompt(
                msgs, tok, tmpl, num_image_tokens=bundle.num_image_tokens, meta=meta, num_images=len(images)
            )
        except MMTuneError as exc:
            raise MMTuneError(f"record {rid!r}: {exc}") from None
        prepared.append((rid, ids, images))

    def pixels(i: int) -> list[torch.Tensor]:
        rid, _, images = prepared[i]
        try:
            return [bundle.image_transform(load_image(resolve_image_path(p, image_root))) for p in images]
        except MMTuneError as exc:
            raise MMTuneError(f"record {rid!r}: {exc}") from None

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stops = stop_token_ids(tok, tmpl)
    order = sorted(range(len(prepared)), key=lambda i: len(prepared[i][1]))  # less padding per batch
    answers: list[str] = [""] * len(prepared)
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    device = model.device
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    try:
        for idx in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
            ids = pad_sequences([prepared[i][1] for i in idx], pad_id, side="left")
            mask = pad_sequences([[1] * len(prepared[i][1]) for i in idx], 0, side="left")
            pix = [p for i in idx for p in pixels(i)]
            out = model.generate(
                ids.to(device),
                mask.to(device),
                pixel_values=torch.stack(pix).to(device) if pix else None,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                eos_token_id=stops or None,
                pad_token_id=pad_id,
            )
            for row, i in enumerate(idx):
                new = out[row].tolist()
                ends = [new.index(t) for t in stops if t in new]
                if ends:
                    new = new[: min(ends)]
                text = tok.decode(new, skip_special_tokens=True)
                answers[i] = _trim(text, tmpl.stop_strings)
    finally:
        model.train(was_training)
    return answers


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


trained_template = checkpoint_template  # the template a checkpoint was trained with


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a saved model / checkpoint folder, or a run folder (latest checkpoint-*)")
    parser.add_argument("--prompt", required=True, help="the user's message")
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
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="LM dtype (default: the model config's)",
    )


def cli_main(args: argparse.Namespace) -> int:
    from mmtune.model.io import load_model, resolve_checkpoint

    if args.max_new_tokens < 1:
        raise MMTuneError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.do_sample and (args.temperature <= 0 or not 0 < args.top_p <= 1):
        raise MMTuneError("--temperature must be > 0 and --top-p in (0, 1] when sampling")
    ckpt = resolve_checkpoint(args.checkpoint)
    template = args.template or trained_template(ckpt)
    if template is None:
        template = DEFAULT_TEMPLATE
        print(f"no run_config.yaml with data.template next to {ckpt}; using template {template}", file=sys.stderr)
    if template != "tokenizer":
        get_template(template)  # fail early (one line) on an unknown name, before loading the model
    images = [str(Path(p)) for p in args.image]
    content = args.prompt
    n_ph = content.count(IMAGE_PLACEHOLDER)
    if images and n_ph == 0:
        content = f"{IMAGE_PLACEHOLDER}\n" * len(images) + content
    elif n_ph != len(images):
        raise MMTuneError(f"--prompt has {n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} --image given")
    for p in images:
        if not Path(p).is_file():
            raise MMTuneError(f"--image {p}: file not found")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"loading {ckpt} (template {template}, device {device})", file=sys.stderr)
    bundle = load_model(ckpt, device=device, dtype=args.dtype)
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
