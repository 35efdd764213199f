"""Prompt templates: how a conversation becomes the text a model reads.

A template renders messages into *segments*: pieces of text each marked as
trained (assistant responses, their end-of-turn marker) or not (system, user,
role tags). Tokenization labels tokens by which segment their characters
came from, so loss masks follow the template exactly and never depend on
tokenizing pieces separately (the source of other toolkits' "tokenization
mismatch" warnings).

Each template also has a Jinja `chat_template` that renders the same text, so
an exported tokenizer/processor prompts the model exactly as mmtune trained it.

Templates: `alpaca` (Stanford Alpaca, with and without input), `vicuna_v1`
(as LLaVA-1.5 uses it), `chatml`, `plain` (LLaVA-1.5 stage-1 pretraining:
image, caption) and `tokenizer` (the tokenizer's own `chat_template`, Jinja
as released: Qwen2.5, Llama-3, Mistral v0.3, llava-hf processors). `few_shot` builds in-context prompts from solved examples.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mmtune.data.schema import IMAGE_PLACEHOLDER, Record
from mmtune.errors import MMTuneError


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool = False


Messages = Sequence[dict[str, str]]


class TemplateError(MMTuneError):
    pass


# --------------------------------------------------------------------------- #
# Alpaca
# --------------------------------------------------------------------------- #

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _render_alpaca(messages: Messages, add_generation_prompt: bool, eos: str, meta: dict[str, Any] | None) -> list[Segment]:
    meta = meta or {}
    segs: list[Segment] = []
    first = True
    for msg in messages:
        if msg["role"] == "system":
            continue  # Alpaca has a fixed preamble and no system turn
        if msg["role"] == "user":
            if first:
                instruction, inp = msg["content"], ""
                # Alpaca records keep instruction/input apart in meta; render them exactly.
                if "instruction" in meta and alpaca_user(meta["instruction"], meta.get("input")) == msg["content"]:
                    instruction, inp = meta["instruction"], meta.get("input") or ""
                tmpl = ALPACA_PROMPT_INPUT if inp else ALPACA_PROMPT_NO_INPUT
                segs.append(Segment(tmpl.format(instruction=instruction, input=inp)))
                first = False
            else:
                segs.append(Segment(f"\n\n### Instruction:\n{msg['content']}\n\n### Response:\n"))
        else:
            segs.append(Segment(msg["content"] + eos, train=True))
    return segs


def alpaca_user(instruction: str, input_text: str | None = None) -> str:
    """The user turn of an Alpaca row: instruction, a blank line, then the input if any.

    `data.formats` writes Alpaca rows' user turns with this, keeping
    instruction and input in `meta`; the alpaca template recognizes exactly
    this text (with that meta) and renders the original Alpaca prompt, with or
    without its "### Input:" section.
    """
    return f"{instruction}\n\n{input_text}" if input_text else instruction


ALPACA_JINJA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first or (loop.index0 == 1 and messages[0]['role'] == 'system') %}"
    "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\\n\\n### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% else %}{{ '\\n\\n### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


# --------------------------------------------------------------------------- #
# Vicuna v1 (LLaVA-1.5's conv_vicuna_v1)
# --------------------------------------------------------------------------- #

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def _render_vicuna(messages: Messages, add_generation_prompt: bool, eos: str, meta: dict[str, Any] | None) -> list[Segment]:
    system = VICUNA_SYSTEM
    body = list(messages)
    if body and body[0]["role"] == "system":
        system = body[0]["content"]
        body = body[1:]
    segs = [Segment(system + " ")]
    for msg in body:
        if msg["role"] == "user":
            segs.append(Segment(f"USER: {msg['content']} ASSISTANT:"))
        elif msg["role"] == "assistant":
            # The separating space is generated by the model after "ASSISTANT:", so it is trained.
            segs.append(Segment(" " + msg["content"] + eos, train=True))
    return segs


VICUNA_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
    "{% else %}{{ '" + VICUNA_SYSTEM.replace("'", "\\'") + " ' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' ASSISTANT:' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


# --------------------------------------------------------------------------- #
# ChatML
# --------------------------------------------------------------------------- #


def _render_chatml(messages: Messages, add_generation_prompt: bool, eos: str, meta: dict[str, Any] | None) -> list[Segment]:
    segs: list[Segment] = []
    for msg in messages:
        head = f"<|im_start|>{msg['role']}\n"
        if msg["role"] == "assistant":
            segs.append(Segment(head))
            segs.append(Segment(msg["content"] + "<|im_end|>", train=True))
            segs.append(Segment("\n"))
        else:
            segs.append(Segment(head + msg["content"] + "<|im_end|>\n"))
    if add_generation_prompt:
        segs.append(Segment("<|im_start|>assistant\n"))
    return segs


CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- #
# Plain (LLaVA-1.5 stage-1 pretraining)
# --------------------------------------------------------------------------- #


def _render_plain(messages: Messages, add_generation_prompt: bool, eos: str, meta: dict[str, Any] | None) -> list[Segment]:
    """LLaVA's `conv_llava_plain` as its `preprocess_plain` trains it: the image, then the caption and "\n".

    The user turn is replaced by its image placeholders alone (the
    instruction text is dropped, as LLaVA does); there is no system prompt and
    no role tag. The caption and the "\n" separator after it are trained;
    there is no EOS (LLaVA's stage 1 has none either).
    """
    segs: list[Segment] = []
    for msg in messages:
        if msg["role"] == "user":
            n = msg["content"].count(IMAGE_PLACEHOLDER)
            if n:
                segs.append(Segment(IMAGE_PLACEHOLDER * n))
        elif msg["role"] == "assistant":
            segs.append(Segment(msg["content"] + "\n", train=True))
    return segs


PLAIN_JINJA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if message['content'] is string %}{{ '<image>' * (message['content'].split('<image>') | length - 1) }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '\\n' }}{% endif %}"
    "{% endfor %}"
)


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #

Renderer = Callable[[Messages, bool, str, "dict[str, Any] | None"], list[Segment]]


@dataclass(frozen=True)
class Template:
    """A named prompt format: a segment renderer plus its Jinja equivalent."""

    name: str
    renderer: Renderer
    jinja: str | None
    # Text that marks the end of an answer when it is not a single special token (generation cuts there).
    stop_strings: tuple[str, ...] = ()

    def render(
        self,
        messages: Messages,
        *,
        add_generation_prompt: bool = False,
        eos_token: str = "</s>",
        meta: dict[str, Any] | None = None,
    ) -> list[Segment]:
        return self.renderer(messages, add_generation_prompt, eos_token, meta)

    def render_text(self, messages: Messages, **kwargs: Any) -> str:
        return "".join(s.text for s in self.render(messages, **kwargs))

    def chat_template(self) -> str:
        if self.jinja is None:
            raise TemplateError(f"template {self.name!r} has no Jinja chat_template")
        return self.jinja


TEMPLATES: dict[str, Template] = {
    "alpaca": Template("alpaca", _render_alpaca, ALPACA_JINJA),
    "vicuna_v1": Template("vicuna_v1", _render_vicuna, VICUNA_JINJA, stop_strings=("USER:",)),
    "chatml": Template("chatml", _render_chatml, CHATML_JINJA, stop_strings=("<|im_end|>",)),
    "plain": Template("plain", _render_plain, PLAIN_JINJA, stop_strings=("\n",)),
}


# --------------------------------------------------------------------------- #
# The tokenizer's own chat_template
# --------------------------------------------------------------------------- #

# Stands in for one assistant answer while a chat_template renders the
# conversation; it holds no whitespace, so templates that trim/strip content
# leave it whole. A rendering in which it does not appear exactly once cannot
# be labelled exactly and is refused.
_SENTINEL = "MMTUNEANSWER{}Q7ZK"


def content_parts(text: str) -> list[dict[str, str]]:
    """A string content as a processor takes it: image and text parts in the string's order.

    Each `<image>` becomes `{"type": "image"}` (a newline right after it is
    the separator mmtune writes and is dropped: list-of-parts templates add
    their own); the text between images becomes `{"type": "text"}` parts.
    """
    parts: list[dict[str, str]] = []
    pieces = text.split(IMAGE_PLACEHOLDER)
    for k, piece in enumerate(pieces):
        if k > 0:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


class TokenizerTemplate:
    """Renders with a tokenizer's (or processor's) Jinja chat_template; labels come from sentinel renders.

    Written here rather than taken from transformers'
    `return_assistant_tokens_mask`, because that needs `{% generation %}`
    tags, which most released templates (Qwen2.5, Llama-3, Mistral) lack.

    The training text is the template's own rendering of the conversation
    (`apply_chat_template`). For each assistant turn the conversation is
    rendered again with that answer replaced by a sentinel: the text before
    the sentinel must be a prefix of the real rendering and the text after it
    a suffix, so whatever lies between is that answer as the template wrote it
    (trimmed or not). This stays exact for templates that rewrite earlier
    turns (Mistral v0.3 moves the system prompt into the last user turn),
    where rendering prefixes of the conversation does not; the last answer is
    trained after exactly its inference prompt (see `_training_text`). The
    end-of-turn marker right after an answer (a special token such as
    `<|im_end|>`, `<|eot_id|>`, `</s>`, with any whitespace before it) is
    trained too; a template that ends answers with no special token (the
    llava-hf one) gets the tokenizer's EOS inserted after each answer, so the
    model learns to stop. Templates that read message content as a list of
    typed parts (llava-hf processors) get string contents converted by
    `content_parts`. A template that renders an answer twice, drops it, or
    changes text outside it depending on it is refused, naming the template.
    """

    def __init__(self, tokenizer: Any, name: str = "tokenizer") -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"template {name!r} asked for, but the tokenizer has no chat_template")
        self.tokenizer = tokenizer
        self.name = name
        self.source = str(getattr(tokenizer, "name_or_path", "") or "the tokenizer")
        self.parts = self._detect_parts()
        self.markers = [t for t in dict.fromkeys(getattr(tokenizer, "all_special_tokens", [])) if t]
        self.eot = self._detect_end_of_turn()

    # -- rendering ---------------------------------------------------------- #

    def _refuse(self, why: str) -> TemplateError:
        return TemplateError(f"template {self.name!r} (chat_template of {self.source}): {why}; choose a named template")

    def _apply(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
        msgs = [self._content(m) for m in messages]
        from jinja2 import TemplateError as JinjaError

        try:
            out = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        except (JinjaError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            # raise_exception() in the template, or a record shape it cannot take: one line naming the template
            raise self._refuse(f"cannot render this conversation ({' '.join(str(exc).split())[:200]})") from None
        return out if isinstance(out, str) else str(out)

    def _content(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.parts and isinstance(msg.get("content"), str):
            return {**msg, "content": content_parts(msg["content"])}
        return dict(msg)

    def _detect_parts(self) -> bool:
        probe = _SENTINEL.format("P")
        for parts in (False, True):
            self.parts = parts
            try:
                text = self._apply([{"role": "user", "content": probe}], True)
            except TemplateError:
                continue
            if probe in text:
                return parts
        raise self._refuse("renders neither string nor list-of-parts message content")

    def _detect_end_of_turn(self) -> str | None:
        """The special token the template writes right after an answer (None: it writes none)."""
        msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        full = self._apply(msgs, False)
        (_, end), = self._answer_spans(msgs, full, False, with_marker=False)
        return self._marker_after(full, end)

    def _marker_after(self, text: str, pos: int) -> str | None:
        stripped = text[pos:].lstrip()
        for tok in sorted(self.markers, key=len, reverse=True):
            if tok != IMAGE_PLACEHOLDER and stripped.startswith(tok):
                return tok
        return None

    def _locate(self, messages: Messages, i: int, full: str, agp: bool, sentinel: str) -> tuple[int, int]:
        """[start, end) of message i's rendered content in `full` (the rendering of `messages`)."""
        probe = [dict(m, content=sentinel) if j == i else m for j, m in enumerate(messages)]
        text = self._apply(probe, agp)
        if text.count(sentinel) != 1:
            raise self._refuse(f"message {i} ({messages[i]['role']}) is rendered {text.count(sentinel)} times, not once")
        a = text.index(sentinel)
        before, after = text[:a], text[a + len(sentinel):]
        if not (full.startswith(before) and full.endswith(after) and len(before) + len(after) <= len(full)):
            raise self._refuse(f"the text around message {i} depends on its content")
        return len(before), len(full) - len(after)

    def _answer_spans(self, messages: Messages, full: str, agp: bool, *, with_marker: bool = True) -> list[tuple[int, int]]:
        """[start, end) of each assistant answer (and its end-of-turn marker) in `full`."""
        spans = []
        for i, msg in enumerate(messages):
            if msg["role"] == "assistant":
                spans.append(self._extend(full, self._locate(messages, i, full, agp, _SENTINEL.format(i)), with_marker))
        if any(b[0] < a[1] for a, b in itertools.pairwise(spans)):
            raise self._refuse("assistant turns are rendered out of order")
        return spans

    def _extend(self, text: str, span: tuple[int, int], with_marker: bool = True) -> tuple[int, int]:
        start, end = span
        if with_marker and self.eot is not None and self._marker_after(text, end) == self.eot:
            end = text.index(self.eot, end) + len(self.eot)
        return start, end

    def _training_text(self, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
        """A conversation ending in an answer: the inference prompt of that answer, then the answer.

        The prompt is `apply_chat_template(messages[:k], add_generation_prompt=True)`,
        so the last answer is trained on exactly the text the model is prompted
        with at inference, even where the template renders a finished
        conversation differently (Mistral v0.3 drops the system prompt unless
        the last message is a user turn). For other templates this equals
        `apply_chat_template(messages)`.
        """
        k = len(messages) - 1
        head = list(messages[:k])
        prompt = self._apply(head, True)
        spans = self._answer_spans(head, prompt, True) if any(m["role"] == "assistant" for m in head) else []
        full = self._apply(messages, False)
        a, b = self._locate(messages, k, full, False, _SENTINEL.format(k))
        if full.startswith(prompt) and a >= len(prompt):
            start = len(prompt)  # prefix-stable: the answer's part of the rendering begins where the prompt ends
        else:
            # Where the prompt ends inside `full`: the text after the last prompt message's content.
            if not head:
                raise self._refuse("the rendering of a lone answer does not start with the generation prompt")
            u = k - 1
            mark_u, mark_a = _SENTINEL.format("U"), _SENTINEL.format("A")
            p_u = self._apply([dict(m, content=mark_u) if j == u else m for j, m in enumerate(head)], True)
            f_u = self._apply([dict(m, content={u: mark_u, k: mark_a}[j]) if j in (u, k) else m
                               for j, m in enumerate(messages)], False)
            if p_u.count(mark_u) != 1 or f_u.count(mark_u) != 1 or f_u.count(mark_a) != 1:
                raise self._refuse("cannot find where the generation prompt ends in a finished conversation")
            gen = p_u[p_u.index(mark_u) + len(mark_u):]
            after_u = f_u[f_u.index(mark_u) + len(mark_u): f_u.index(mark_a)]
            if not after_u.startswith(gen) or not full[:a].endswith(after_u[len(gen):]):
                raise self._refuse("its generation prompt is not how a finished conversation continues")
            start = a - (len(after_u) - len(gen))
        text = prompt + full[start:]
        shift = len(prompt) - start
        spans.append(self._extend(text, (a + shift, b + shift)))
        return text, spans

    def render(self, messages: Messages, add_generation_prompt: bool, eos: str, meta: dict[str, Any] | None) -> list[Segment]:
        if messages and messages[-1]["role"] == "assistant" and not add_generation_prompt:
            full, spans = self._training_text(messages)
        else:
            full = self._apply(messages, add_generation_prompt)
            spans = self._answer_spans(messages, full, add_generation_prompt) if any(
                m["role"] == "assistant" for m in messages) else []
        segs: list[Segment] = []
        pos = 0
        for a, b in spans:
            if a > pos:
                segs.append(Segment(full[pos:a]))
            segs.append(Segment(full[a:b], train=True))
            if self.eot is None and eos:  # nothing marks the end of an answer: teach EOS (see class docstring)
                segs.append(Segment(eos, train=True))
            pos = b
        if pos < len(full):
            segs.append(Segment(full[pos:]))
        return segs

    def template(self) -> Template:
        stops = (self.eot,) if self.eot else ()
        return Template(self.name, self.render, self.tokenizer.chat_template, stop_strings=stops)


def tokenizer_template(tokenizer: Any) -> Template:
    """The tokenizer's own `chat_template` (see `TokenizerTemplate`)."""
    return TokenizerTemplate(tokenizer).template()


def get_template(name: str, tokenizer: Any = None) -> Template:
    if name == "tokenizer":
        return tokenizer_template(tokenizer)
    if name not in TEMPLATES:
        import difflib

        close = difflib.get_close_matches(name, [*TEMPLATES, "tokenizer"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TemplateError(f"unknown template {name!r}{hint} (have: {', '.join([*TEMPLATES, 'tokenizer'])})")
    return TEMPLATES[name]


# --------------------------------------------------------------------------- #
# In-context (few-shot) prompts
# --------------------------------------------------------------------------- #


def few_shot(query: Record, examples: Sequence[Record], *, instruction_suffix: str = "") -> Record:
    """A record whose conversation is k solved examples followed by the query.

    Each example contributes its first user turn and its first assistant turn
    (or its first reference answer when it has no assistant turn); images are
    carried along in order so placeholders still match. The query's own
    assistant turns are dropped: the model must produce them.
    """
    messages: list[dict[str, str]] = []
    images: list[str] = []
    system = [m for m in query.messages if m["role"] == "system"]
    messages.extend(system)
    for ex in examples:
        user = ex.turns("user")
        answer = ex.turns("assistant") or (ex.answers or [])
        if not user or not answer:
            raise TemplateError(f"few-shot example {ex.id!r} has no user turn or no answer")
        messages.append({"role": "user", "content": user[0] + instruction_suffix})
        messages.append({"role": "assistant", "content": answer[0]})
        images.extend(ex.images[: user[0].count(IMAGE_PLACEHOLDER)])
    q_user = query.turns("user")
    messages.append({"role": "user", "content": q_user[0] + instruction_suffix})
    images.extend(query.images[: q_user[0].count(IMAGE_PLACEHOLDER)])
    return Record(
        id=query.id, messages=messages, images=images, source=query.source, task=query.task,
        answers=query.answers, choices=query.choices, meta=dict(query.meta, few_shot=[e.id for e in examples]),
    )


def prompt_messages(record: Record, *, instruction_suffix: str = "") -> list[dict[str, str]]:
    """The messages up to (not including) the first assistant turn, for zero-shot generation."""
    out: list[dict[str, str]] = []
    for m in record.messages:
        if m["role"] == "assistant":
            break
        out.append(dict(m))
    if instruction_suffix and out and out[-1]["role"] == "user":
        out[-1]["content"] = out[-1]["content"] + instruction_suffix
    return out
