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
(as LLaVA-1.5 uses it), `chatml`, and `tokenizer` (the tokenizer's own
`chat_template`). `few_shot` builds in-context prompts from solved examples.
"""

from __future__ import annotations

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
}


def tokenizer_template(tokenizer: Any) -> Template:
    """The tokenizer's own `chat_template`, with trained spans found by prefix rendering.

    Each assistant turn's text is the difference between rendering the
    conversation through that turn and rendering it up to the generation prompt.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template 'tokenizer' asked for, but the tokenizer has no chat_template")

    def render(messages: Messages, add_generation_prompt: bool, eos: str, meta: dict[str, Any] | None) -> list[Segment]:
        msgs = list(messages)
        segs: list[Segment] = []
        done = ""
        for i, msg in enumerate(msgs):
            if msg["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise TemplateError("the tokenizer's chat_template is not prefix-stable; choose a named template")
            segs.append(Segment(prompt[len(done):]))
            segs.append(Segment(full[len(prompt):], train=True))
            done = full
        tail = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        if len(tail) > len(done):
            segs.append(Segment(tail[len(done):]))
        return segs

    return Template("tokenizer", render, tokenizer.chat_template)


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
