"""Generation from a trained (or freshly built) model: batched, left-padded, KV-cached.

The one generation module of mmtune. One settings object, `DecodeSettings`
(batch size, max_new_tokens, greedy or sampled with temperature / top_p /
seed), travels from every entry point to the decoding core; a batch size
below 1 cannot be constructed. `generate_answers` takes records (or plain
prompts) and returns answer strings in the same order, prompting each record
with its turns up to its first assistant turn; `generate_prompts` (what
`mmtune eval` uses for mmtune models) prompts with whole conversations
instead, as few-shot prompts need; `generate_file` answers a prompts file.
All tokenize their prompts into `TokenizedPrompt`s and decode them with one
core, `generate_tokenized`:
prompts rendered with the training template, image placeholders expanded to
the model's image-token runs, rows sorted by length and left-padded so every
row's new tokens start at the same position, and the LM decoding with its KV
cache (transformers' `generate` on the spliced embeddings).

    mmtune generate runs/tiny_mllm --image cat.png --prompt "What is this?"

prints the answer as its last stdout line (a run folder means its latest
`checkpoint-*`; the template defaults to the one the run trained with).

    mmtune generate runs/tiny_mllm --input prompts.jsonl --out answers.jsonl --batch-size 16

reads unified records or `{"prompt", "image"?, "id"?}` lines and writes one
`{"id", "answer"}` line per input line, in input order (batches are sorted by
length inside `generate_tokenized`, answers are put back in place). A line that
cannot be prompted (bad JSON, bad record, unreadable image, images for a
text-only model) gets `{"id", "error"}` instead, so nothing is dropped silently.
The command line (flags, checks before the model loads) is `mmtune/cli/generate.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from mmtune.data.collate import pad_sequences
from mmtune.data.encode import stop_token_ids, tokenize_prompt
from mmtune.data.images import load_image, resolve_image_path
from mmtune.data.schema import IMAGE_PLACEHOLDER, Record, count_placeholders
from mmtune.data.templates import Template, get_template, prompt_messages
from mmtune.errors import MMTuneError
from mmtune.runs import trained_template

if TYPE_CHECKING:  # the model layer loads transformers; `mmtune eval --predictions` needs none of it
    from mmtune.model.build import ModelBundle

DEFAULT_TEMPLATE = "vicuna_v1"


class PromptSkip(NamedTuple):
    """A prompt that produced no output, and why (evaluation counts these)."""

    reason: str


class TokenizedPrompt(NamedTuple):
    """A prompt ready to decode: token ids (image runs expanded) and its image files in reading order."""

    id: str
    ids: list[int]
    images: list[str]


def check_batch_size(batch_size: int) -> None:
    """Fail (one line) on a batch size below 1, before any prompt is tokenized."""
    if batch_size < 1:
        raise MMTuneError(f"batch_size must be >= 1, got {batch_size}")


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How prompts are decoded, one object for every generation entry point (and the eval backends).

    Greedy unless `do_sample`; `temperature` and `top_p` are read only when
    sampling. `seed` (when not None) seeds torch before the first batch.
    `batch_size` changes speed, never an answer (prompts are left-padded).
    """

    batch_size: int = 16
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_batch_size(self.batch_size)

    @classmethod
    def of(cls, settings: DecodeSettings | None = None, **fields: Any) -> DecodeSettings:
        """`settings` (default: the defaults) with some fields replaced, e.g. `of(max_new_tokens=8)`."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise TypeError(f"unknown generation setting(s) {unknown}; the settings are {names}")
        base = settings if settings is not None else cls()
        return dataclasses.replace(base, **fields) if fields else base


def tokenize_for_generation(
    bundle: ModelBundle,
    rid: str,
    messages: Sequence[dict[str, str]],
    template: Template,
    images: Sequence[str],
    meta: dict[str, Any] | None = None,
) -> TokenizedPrompt:
    """`messages` as a prompt ending where the assistant answers; a tokenizing error names the record."""
    try:
        ids = tokenize_prompt(messages, bundle.tokenizer, template, num_image_tokens=bundle.num_image_tokens,
                              meta=meta, num_images=len(images))
    except MMTuneError as exc:
        raise MMTuneError(f"record {rid!r}: {exc}") from None
    return TokenizedPrompt(rid, ids, list(images))


def check_prompt_record(rec: Record) -> None:
    """A prompt record must end on a user turn (where the assistant answers)."""
    if not rec.messages or rec.messages[-1]["role"] != "user":
        raise MMTuneError(f"record {rec.id!r}: a prompt must end on a user turn")


def max_positions(config: Any) -> int | None:
    """The LM's context length from a transformers config (a multimodal one's text config), if it says."""
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) else None


def _cut_at_stops(text: str, stop_strings: Sequence[str]) -> str:
    cut = min([i for s in stop_strings if (i := text.find(s)) != -1], default=len(text))
    return text[:cut].strip()


@torch.no_grad()
def generate_tokenized(
    bundle: ModelBundle,
    prompts: Sequence[TokenizedPrompt | PromptSkip],
    template: Template,
    settings: DecodeSettings,
    *,
    skip_unreadable_images: bool = False,
    progress: bool = False,
    desc: str = "generate",
    leave: bool = True,
) -> list[str | PromptSkip]:
    """The decoding core of `generate_answers` and `mmtune eval`: one output per prompt, in order.

    Prompts are sorted by length (less padding per batch), left-padded so
    every row's new tokens start at the same position, and decoded with the
    KV cache (`MMTuneModel.generate`). The new tokens are cut at EOS (or the
    template's end-of-turn token), decoded without special tokens and cut at
    the template's stop strings (e.g. "USER:" for vicuna_v1). Images are read
    batch by batch, so a large eval set never sits in memory; one that cannot
    be read raises a one-line error naming the record, or with
    `skip_unreadable_images` makes that prompt a `PromptSkip`. A `PromptSkip`
    given in `prompts` is passed through as it is.
    """
    from tqdm.auto import tqdm

    batch_size = settings.batch_size
    model, tok = bundle.model, bundle.tokenizer
    results: list[str | PromptSkip | None] = [p if isinstance(p, PromptSkip) else None for p in prompts]
    todo = [i for i, p in enumerate(prompts) if isinstance(p, TokenizedPrompt)]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stops = stop_token_ids(tok, template)
    order = sorted(todo, key=lambda i: len(prompts[i].ids))
    batches = [order[j : j + batch_size] for j in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    device = model.device
    try:
        for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch", leave=leave):
            rows, pixels = [], []
            for i in idx:
                try:
                    pix = [bundle.image_transform(load_image(p)) for p in prompts[i].images]
                except MMTuneError as exc:
                    if not skip_unreadable_images:
                        raise MMTuneError(f"record {prompts[i].id!r}: {exc}") from None
                    results[i] = PromptSkip(f"image cannot be loaded ({exc})")
                    continue
                rows.append(i)
                pixels.extend(pix)
            if not rows:
                continue
            ids = pad_sequences([prompts[i].ids for i in rows], pad_id, side="left")
            mask = pad_sequences([[1] * len(prompts[i].ids) for i in rows], 0, side="left")
            out = model.generate(
                ids.to(device),
                mask.to(device),
                pixel_values=torch.stack(pixels).to(device) if pixels else None,
                max_new_tokens=settings.max_new_tokens,
                do_sample=settings.do_sample,
                temperature=settings.temperature,
                top_p=settings.top_p,
                eos_token_id=stops or None,
                pad_token_id=pad_id,
            )
            for row, i in enumerate(rows):
                new = out[row].tolist()
                ends = [new.index(t) for t in stops if t in new]
                if ends:
                    new = new[: min(ends)]
                results[i] = _cut_at_stops(tok.decode(new, skip_special_tokens=True), template.stop_strings)
    finally:
        model.train(was_training)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def generate_answers(
    bundle: ModelBundle,
    records_or_prompts: Sequence[Record | str],
    template: str | Template,
    settings: DecodeSettings | None = None,
    *,
    image_root: str | Path | None = None,
    instruction_suffix: str = "",
    progress: bool = False,
    **fields: Any,
) -> list[str]:
    """One answer per input, in input order, decoded with `settings` (its fields may also come as keywords,
    e.g. `max_new_tokens=8`, over the defaults or over `settings`).

    A Record is prompted with its messages up to the first assistant turn
    (and the images those turns name, read relative to `image_root`); a str
    is one user turn, text-only. The answer is the decoded new tokens, cut at
    EOS and at the template's stop strings (see `generate_tokenized`). Any
    input that cannot be prompted (images on a text-only model, a bad
    placeholder count, an unreadable image) raises a one-line error.
    """
    settings = DecodeSettings.of(settings, **fields)
    tmpl = template if isinstance(template, Template) else get_template(template, bundle.tokenizer)
    # Token ids for every prompt up front (cheap, and needed to sort by length).
    prepared: list[TokenizedPrompt] = []
    for item in records_or_prompts:
        if isinstance(item, str):
            msgs = [{"role": "user", "content": item + instruction_suffix}]
            prepared.append(tokenize_for_generation(bundle, "<prompt>", msgs, tmpl, []))
            continue
        msgs = prompt_messages(item, instruction_suffix=instruction_suffix)
        images = [resolve_image_path(p, image_root) for p in item.images[: count_placeholders(msgs)]]
        if images and bundle.image_transform is None:
            raise MMTuneError(f"record {item.id!r} has images but the model is text-only (mode llm)")
        prepared.append(tokenize_for_generation(bundle, item.id, msgs, tmpl, images, item.meta))
    answers = generate_tokenized(bundle, prepared, tmpl, settings, progress=progress)
    return answers  # type: ignore[return-value]  # no skips: every failure above raises


def generate_prompts(
    bundle: ModelBundle,
    prompts: Sequence[Record],
    template: str | Template,
    settings: DecodeSettings | None = None,
    *,
    progress: bool = False,
    desc: str = "generate",
    **fields: Any,
) -> list[str | PromptSkip]:
    """One output per prompt record of an mmtune model, in order: batched, left-padded, KV-cached.

    Each record's messages are the whole prompt (e.g. few-shot examples and
    their answers, then the question) and must end on a user turn; images are
    absolute paths in reading order. Decoding is `generate_answers`' own
    (`generate_tokenized`); only the prompts differ, as `generate_answers`
    cuts every record at its first assistant turn. A prompt with images for a
    text-only model, whose images cannot be read, or that leaves no room for
    `max_new_tokens` within the LM's context, becomes a `PromptSkip` with its
    reason. `settings` and `fields` as in `generate_answers`.
    """
    settings = DecodeSettings.of(settings, **fields)
    tmpl = template if isinstance(template, Template) else get_template(template, bundle.tokenizer)
    limit = max_positions(getattr(getattr(bundle.model, "lm", None), "config", None))
    prepared: list[TokenizedPrompt | PromptSkip] = []
    for rec in prompts:
        check_prompt_record(rec)
        if rec.images and bundle.image_transform is None:
            prepared.append(PromptSkip("record has images but the model is text-only"))
            continue
        prompt = tokenize_for_generation(bundle, rec.id, rec.messages, tmpl, rec.images, rec.meta)
        if limit is not None and len(prompt.ids) + settings.max_new_tokens > limit:
            prepared.append(PromptSkip("prompt too long for the model's context"))
            continue
        prepared.append(prompt)
    return generate_tokenized(bundle, prepared, tmpl, settings, skip_unreadable_images=True, progress=progress,
                              desc=desc, leave=False)



def pick_template(folder: Path, template: str | None = None) -> tuple[str, bool]:
    """The template to prompt the model in `folder` with, and whether it is the fallback.

    `template` when given, else the one its run trained with (`run_config.yaml`
    beside it), else `DEFAULT_TEMPLATE` (then the flag is True, so the caller
    can say so). A name is checked here, before any model loads.
    """
    chosen = template or trained_template(folder)
    fallback = chosen is None
    chosen = chosen or DEFAULT_TEMPLATE
    if chosen != "tokenizer":
        get_template(chosen)  # fail early (one line) on an unknown name
    return chosen, fallback


class PromptLine(NamedTuple):
    """One line of a `--input` file: its id and the record to prompt, or why it cannot be prompted."""

    line: int
    id: str
    record: Record | None
    error: str | None = None


def read_prompt_file(path: str | Path, image_root: str | Path | None = None) -> list[PromptLine]:
    """Unified records or `{"prompt", "image" | "images", "id"?}` lines; relative images from `image_root`
    (default: the file's folder). Every non-blank line gives one `PromptLine`, bad ones with `error` set."""
    from mmtune.data.schema import RecordError, validate_record
    from mmtune.data.textio import iter_json_lines

    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    out: list[PromptLine] = []
    try:
        lines = list(iter_json_lines(path))  # BOM, bad bytes, lone surrogates: one bad line each
    except OSError as exc:
        raise MMTuneError(f"{path}: cannot read the prompts file ({exc.strerror or exc})") from None
    for lineno, obj, reason, _ in lines:
        rid = f"{path.stem}-{lineno}"
        if reason is not None:
            out.append(PromptLine(lineno, rid, None, f"{path}:{lineno}: {reason}"))
            continue
        if isinstance(obj, dict) and isinstance(obj.get("id"), str | int) and not isinstance(obj.get("id"), bool):
            rid = str(obj["id"])
        try:
            if isinstance(obj, dict) and "prompt" in obj and "messages" not in obj:
                obj = _prompt_as_record(obj, rid)
            record = validate_record(obj, path=str(path), line=lineno)
        except RecordError as exc:
            out.append(PromptLine(lineno, rid, None, exc.describe()))
            continue
        record.images = [resolve_image_path(p, root) for p in record.images]
        out.append(PromptLine(lineno, record.id, record))
    return out


def _prompt_as_record(obj: dict[str, Any], rid: str) -> dict[str, Any]:
    from mmtune.data.schema import RecordError

    prompt = obj["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise RecordError("must be a non-empty string", field="prompt", record_id=rid)
    extra = sorted(set(obj) - {"prompt", "image", "images", "id"})
    if extra:
        raise RecordError(f"unknown field(s) {extra} (a prompt line has prompt, image(s), id)", field=extra[0],
                          record_id=rid)
    images = obj.get("images", obj.get("image")) or []
    images = [images] if isinstance(images, str) else images
    if isinstance(images, list) and images and prompt.count(IMAGE_PLACEHOLDER) == 0:
        prompt = f"{IMAGE_PLACEHOLDER}\n" * len(images) + prompt  # as the single-prompt form does
    return {"id": rid, "messages": [{"role": "user", "content": prompt}], "images": images}


def generate_file(
    bundle: ModelBundle,
    input_path: str | Path,
    out_path: str | Path,
    template: str | Template,
    settings: DecodeSettings | None = None,
    *,
    image_root: str | Path | None = None,
    progress: bool = True,
    **fields: Any,
) -> tuple[int, int]:
    """Answer every line of `input_path` into `out_path` (JSONL, written atomically), in input order.

    Returns (answered, errors). Prompts are decoded in batches by `generate_tokenized` (KV cache,
    left padding) with `settings` (default: batches of 8), whose fields may also come as keywords.
    """
    import json

    settings = DecodeSettings.of(settings if settings is not None else DecodeSettings(batch_size=8), **fields)
    tmpl = template if isinstance(template, Template) else get_template(template, bundle.tokenizer)
    lines = read_prompt_file(input_path, image_root)
    prompts: list[TokenizedPrompt | PromptSkip] = []
    for pl in lines:
        if pl.record is None:
            prompts.append(PromptSkip(pl.error or "unreadable line"))
            continue
        msgs = prompt_messages(pl.record)
        images = pl.record.images[: count_placeholders(msgs)]
        if images and bundle.image_transform is None:
            prompts.append(PromptSkip(f"{input_path}:{pl.line}: record {pl.id!r} has images but the model is "
                                      "text-only (mode llm)"))
            continue
        try:
            prompts.append(tokenize_for_generation(bundle, pl.id, msgs, tmpl, images, pl.record.meta))
        except MMTuneError as exc:
            prompts.append(PromptSkip(f"{input_path}:{pl.line}: {exc}"))
    answers = generate_tokenized(bundle, prompts, tmpl, settings, skip_unreadable_images=True,
                                 progress=progress, desc="generate")
    from mmtune.fileio import atomic_text

    errors = 0
    with atomic_text(out_path) as fh:
        for pl, answer in zip(lines, answers, strict=True):
            if isinstance(answer, PromptSkip):
                errors += 1
                reason = answer.reason if answer.reason.startswith(str(input_path)) else \
                    f"{input_path}:{pl.line}: {answer.reason}"
                row = {"id": pl.id, "line": pl.line, "error": reason}
            else:
                row = {"id": pl.id, "answer": answer}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(lines) - errors, errors
