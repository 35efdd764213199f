"""Records -> token ids, loss labels and image positions.

The rendered conversation is tokenized once, as one string, and each token is
labelled from the template segment its characters came from: a token that
holds any assistant-response character is trained, every other token gets
-100. Every assistant turn of a multi-turn record is trained. The tokenizer's
own special tokens (BOS) are added unless the rendered text already starts
with BOS (Llama-3 and Mistral templates write it): exactly one BOS either way.
A record the template cannot render raises `SkipRecord` (kind `template_error`).

Each `<image>` placeholder (one special token) is expanded into a run of
`num_image_tokens` copies of the image token id; the model writes one image's
projected features over exactly that run. Truncation to `max_length` is
explicit: text is cut from the end, image runs are never cut, and a record
that still cannot fit, or ends up with no trained token, raises `SkipRecord`
so the caller counts it and names it; it is never trained on silently.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mmtune.data.schema import IMAGE_PLACEHOLDER, Record
from mmtune.data.templates import Segment, Template, TemplateError
from mmtune.errors import MMTuneError

IGNORE_INDEX = -100


class SkipRecord(MMTuneError):
    """This record cannot be trained on; `kind` says why, for the run's skip counters."""

    def __init__(self, record_id: str, kind: str, detail: str) -> None:
        self.record_id = record_id
        self.kind = kind
        super().__init__(f"record {record_id!r}: {detail}")


@dataclass
class TokenizedExample:
    """One record as the model sees it."""

    id: str
    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) per image
    truncated_tokens: int = 0  # text tokens cut by truncation (0 = untouched)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def image_token_id(tokenizer: Any) -> int:
    tid = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if tid is None or tid == getattr(tokenizer, "unk_token_id", object()):
        raise MMTuneError(f"tokenizer has no {IMAGE_PLACEHOLDER} token; build it with mmtune.data.tokenizer")
    return int(tid)


def adds_bos(text: str, tokenizer: Any) -> bool:
    """Whether to let the tokenizer add its special tokens: not when the template already wrote BOS.

    Templates of Llama-3 and Mistral start with `bos_token` themselves;
    `add_special_tokens=True` on top would give two BOS tokens.
    """
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def _backend(tokenizer: Any) -> Any | None:
    """The `tokenizers.Tokenizer` behind a fast tokenizer when calling it directly gives what `tokenizer(text)` does.

    transformers' `__call__` on a fast tokenizer resets the backend's truncation and
    padding and then calls its `encode_batch`; with neither set, the backend's own
    `encode` gives the same ids and offsets for a fraction of the Python overhead
    (tests/test_real_tokenizers.py compares both on released tokenizers).
    None (use `tokenizer(...)`) for slow tokenizers or a backend left truncating/padding.
    """
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or getattr(backend, "truncation", None) is not None or getattr(backend, "padding", None) is not None:
        return None
    return backend if hasattr(backend, "encode") else None


def encode_with_offsets(text: str, tokenizer: Any, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) of `text`, as `tokenizer(text, return_offsets_mapping=True)` gives them."""
    backend = _backend(tokenizer)
    if backend is not None:
        enc = backend.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets
    out = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(out["input_ids"]), list(out["offset_mapping"])


def _encode_segments(segments: Sequence[Segment], tokenizer: Any) -> tuple[list[int], list[bool]]:
    text = "".join(s.text for s in segments)
    starts: list[int] = []
    trained: list[bool] = []
    pos = 0
    for s in segments:
        starts.append(pos)
        trained.append(s.train)
        pos += len(s.text)
    # Character -> is-trained lookup through segment boundaries.
    ids, offsets = encode_with_offsets(text, tokenizer, adds_bos(text, tokenizer))
    flags: list[bool] = []
    for a, b in offsets:
        if b <= a:  # special tokens the tokenizer added (BOS) carry an empty span
            flags.append(False)
            continue
        first = max(bisect_right(starts, a) - 1, 0)
        last = bisect_right(starts, b - 1) - 1
        flags.append(trained[first] if first >= last else any(trained[first:last + 1]))
    return ids, flags


def _expand_images(ids: list[int], flags: list[bool], img_id: int, n: int) -> tuple[list[int], list[bool], list[tuple[int, int]]]:
    out_ids: list[int] = []
    out_flags: list[bool] = []
    spans: list[tuple[int, int]] = []
    for tid, fl in zip(ids, flags, strict=True):
        if tid == img_id:
            spans.append((len(out_ids), len(out_ids) + n))
            out_ids.extend([img_id] * n)
            out_flags.extend([False] * n)
        else:
            out_ids.append(tid)
            out_flags.append(fl)
    return out_ids, out_flags, spans


def _truncate(ids: list[int], flags: list[bool], spans: list[tuple[int, int]], max_length: int) -> tuple[list[int], list[bool], list[tuple[int, int]], int]:
    """Drop text tokens from the end until the sequence fits; image runs are kept whole."""
    excess = len(ids) - max_length
    if excess <= 0:
        return ids, flags, spans, 0
    in_image = [False] * len(ids)
    for a, b in spans:
        for i in range(a, b):
            in_image[i] = True
    drop: set[int] = set()
    for i in range(len(ids) - 1, -1, -1):
        if len(drop) == excess:
            break
        if not in_image[i]:
            drop.add(i)
    if len(drop) < excess:
        return ids, flags, spans, -1
    keep = [i for i in range(len(ids)) if i not in drop]
    remap = {old: new for new, old in enumerate(keep)}
    new_spans = [(remap[a], remap[b - 1] + 1) for a, b in spans]
    return [ids[i] for i in keep], [flags[i] for i in keep], new_spans, excess


def tokenize_record(
    record: Record,
    tokenizer: Any,
    template: Template,
    *,
    max_length: int,
    num_image_tokens: int = 0,
) -> TokenizedExample:
    """Tokenize a record for training: ids, -100 outside assistant turns, image runs.

    Raises SkipRecord when the record has no trained token after truncation or
    its images alone do not fit in max_length.
    """
    try:
        segments = template.render(record.messages, eos_token=tokenizer.eos_token or "", meta=record.meta)
    except TemplateError as exc:  # e.g. a chat_template that refuses this record's roles: a counted skip
        raise SkipRecord(record.id, "template_error", str(exc)) from None
    ids, flags = _encode_segments(segments, tokenizer)
    img_id = image_token_id(tokenizer) if record.images else None
    spans: list[tuple[int, int]] = []
    if img_id is not None:
        found = ids.count(img_id)
        if found != len(record.images):
            raise SkipRecord(record.id, "image_token_mismatch",
                             f"{found} image token(s) after tokenization but {len(record.images)} image(s)")
        if num_image_tokens <= 0:
            raise MMTuneError("num_image_tokens must be > 0 for records with images (is the model in llm mode?)")
        ids, flags, spans = _expand_images(ids, flags, img_id, num_image_tokens)
    ids, flags, spans, cut = _truncate(ids, flags, spans, max_length)
    if cut < 0 and not spans:  # nothing but text, and still no room: the setting is wrong, not the record
        raise MMTuneError(f"max_length must be >= 1 (data.max_length), got {max_length}")
    if cut < 0:
        raise SkipRecord(record.id, "images_exceed_max_length",
                         f"{len(spans)} image(s) x {num_image_tokens} tokens do not fit in max_length={max_length}")
    labels = [t if f else IGNORE_INDEX for t, f in zip(ids, flags, strict=True)]
    if True not in flags:
        why = "truncated to max_length" if cut else "template/tokenizer left no assistant token"
        raise SkipRecord(record.id, "no_trainable_tokens", f"no trainable token ({why})")
    return TokenizedExample(record.id, ids, labels, spans, cut)


def stop_token_ids(tokenizer: Any, template: Template) -> list[int]:
    """Token ids that end an answer: EOS plus the template's stop strings that are single special tokens."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    special = set(getattr(tokenizer, "all_special_tokens", []))
    for s in template.stop_strings:
        if s in special:
            tid = tokenizer.convert_tokens_to_ids(s)
            if tid is not None and tid not in ids:
                ids.append(int(tid))
    return ids


def tokenize_prompt(
    messages: Sequence[dict[str, str]],
    tokenizer: Any,
    template: Template,
    *,
    num_image_tokens: int = 0,
    meta: dict[str, Any] | None = None,
    num_images: int | None = None,
) -> list[int]:
    """Token ids of a prompt that ends where the model should start answering."""
    text = template.render_text(messages, add_generation_prompt=True, eos_token=tokenizer.eos_token or "", meta=meta)
    ids = list(tokenizer(text, add_special_tokens=adds_bos(text, tokenizer))["input_ids"])
    n_ph = text.count(IMAGE_PLACEHOLDER)
    if n_ph:
        img_id = image_token_id(tokenizer)
        if num_images is not None and num_images != n_ph:
            raise MMTuneError(f"prompt has {n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s)")
        if num_image_tokens <= 0:
            raise MMTuneError("this model takes no images (num_image_tokens is 0) but the prompt has one")
        ids, _, _ = _expand_images(ids, [False] * len(ids), img_id, num_image_tokens)
    return ids


def prompt_text(messages: Sequence[dict[str, str]], tokenizer: Any, template: Template, meta: dict[str, Any] | None = None) -> str:
    """The prompt string (placeholders unexpanded), as `apply_chat_template` would render it."""
    return template.render_text(messages, add_generation_prompt=True, eos_token=tokenizer.eos_token or "", meta=meta)
