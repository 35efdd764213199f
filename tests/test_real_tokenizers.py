"""Released tokenizers and chat templates: rendered text, BOS/EOS and loss masks token by token.

The tokenizer files live in ../shared/data/tokenizers (see its PROVENANCE.md);
every test here skips, naming the folder, when they are absent. Expected
labels are computed independently of mmtune's segment machinery: each answer
(plus the end-of-turn marker the family writes after it) is found in the
rendered text with `str.find`, and a token is trained exactly when its
character span overlaps one of those answers.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHARED_DATA

from mmtune.data.encode import (
    IGNORE_INDEX,
    stop_token_ids,
    tokenize_prompt,
    tokenize_record,
)
from mmtune.data.schema import Record
from mmtune.data.templates import (
    VICUNA_SYSTEM,
    TemplateError,
    content_parts,
    get_template,
)
from mmtune.data.tokenizer import prepare_tokenizer

TOKENIZERS = SHARED_DATA / "tokenizers"
FIX = Path(__file__).parent / "fixtures" / "templates"
# Llama-3.2's template prints today's date (strftime_now) unless given date_string: both sides use today.
DATE = datetime.date.today().strftime("%d %b %Y")

# family folder -> (BOS token or None, the end-of-turn token its own template writes after an answer)
FAMILIES = {
    "qwen2.5-instruct": (None, "<|im_end|>"),
    "vicuna-7b-v1.5": ("<s>", "</s>"),
    "llama-3.2-instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral-7b-instruct-v0.3": ("<s>", "</s>"),
    "llava-1.5-7b-hf": ("<s>", None),  # its template ends answers with a space; mmtune adds </s>
}

SINGLE = [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Blue, mostly."}]
MULTI = SINGLE + [{"role": "user", "content": "And at night?"}, {"role": "assistant", "content": "Dark: black or deep navy."}]
SYSTEM = [{"role": "system", "content": "Answer in five words or fewer."}, *MULTI]
RECORDS = {"single": SINGLE, "multi": MULTI, "system": SYSTEM}


_CACHE: dict[str, Any] = {}


def load(family: str) -> Any:
    folder = TOKENIZERS / family
    if not folder.is_dir():
        pytest.skip(f"{folder} not present (released tokenizers live in ../shared/data/tokenizers next to the repo)")
    if family not in _CACHE:
        from transformers import AutoTokenizer

        _CACHE[family] = prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder)))
    return _CACHE[family]


def apply(tok: Any, messages: list[dict[str, Any]], gen: bool, parts: bool = False) -> str:
    if parts:
        messages = [dict(m, content=content_parts(m["content"])) for m in messages]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, date_string=DATE)


def expected_labels(tok: Any, text: str, answers: list[str], eot: str | None, ids: list[int], offsets: list) -> list[int]:
    """-100 everywhere but on tokens overlapping an answer (+ whitespace + `eot` right after it)."""
    spans, pos = [], 0
    for ans in answers:
        a = text.find(ans.strip(), pos)
        assert a >= 0, f"answer {ans!r} not in rendered text {text!r}"
        b = a + len(ans.strip())
        if eot is not None:
            rest = text[b:]
            assert rest.lstrip().startswith(eot), f"no {eot!r} after answer {ans!r}: {rest[:20]!r}"
            b += len(rest) - len(rest.lstrip()) + len(eot)
        spans.append((a, b))
        pos = b
    out = []
    for tid, (s, e) in zip(ids, offsets, strict=True):
        hit = e > s and any(s < b and e > a for a, b in spans)
        out.append(tid if hit else IGNORE_INDEX)
    return out


def check_tokens(tok: Any, rec: Record, template: Any, text: str, bos: str | None, eot: str | None) -> Any:
    """The record tokenizes as `text` (one BOS), with every answer token trained and nothing else."""
    ex = tokenize_record(rec, tok, template, max_length=100_000, num_image_tokens=1)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = list(enc["offset_mapping"])
    if bos is not None and not text.startswith(bos):
        ids, offsets = [tok.convert_tokens_to_ids(bos), *ids], [(0, 0), *offsets]
    assert ex.input_ids == ids
    if bos is not None:
        bos_id = tok.convert_tokens_to_ids(bos)
        assert ex.input_ids[0] == bos_id and ex.input_ids.count(bos_id) == 1, "exactly one BOS, at the start"
    else:
        assert tok.bos_token is None
    answers = [m["content"] for m in rec.messages if m["role"] == "assistant"]
    assert ex.labels == expected_labels(tok, text, answers, eot, ids, offsets)
    return ex


# --------------------------------------------------------------------------- #
# Each family's own chat template (`template: tokenizer`)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", list(RECORDS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_own_chat_template_text_and_labels(family: str, kind: str) -> None:
    tok = load(family)
    bos, eot = FAMILIES[family]
    parts = family == "llava-1.5-7b-hf"  # its template reads content as a list of typed parts
    msgs = RECORDS[kind]
    t = get_template("tokenizer", tok)
    # The inference prompt is the template's, to the character.
    prompt = msgs[:-1]
    rendered = t.render_text(prompt, add_generation_prompt=True, eos_token=tok.eos_token)
    if family == "llava-1.5-7b-hf":  # the one difference: </s> after earlier answers, as mmtune trains them
        assert rendered.replace("</s>", "") == apply(tok, prompt, True, parts)
        assert rendered.count("</s>") == len([m for m in prompt if m["role"] == "assistant"])
    else:
        assert rendered == apply(tok, prompt, True, parts)
    # The training text: the rendered conversation; Mistral v0.3 drops the system prompt from a finished
    # conversation, so mmtune trains the last answer after exactly its inference prompt (system included).
    text = t.render_text(msgs, eos_token=tok.eos_token)
    if family == "mistral-7b-instruct-v0.3" and kind == "system":
        assert text == apply(tok, prompt, True) + " " + msgs[-1]["content"] + "</s>"
        assert "Answer in five words" in text and text != apply(tok, msgs, False)
    elif family == "llava-1.5-7b-hf":
        # the template writes no end-of-turn token: mmtune adds </s> after each answer, nothing else changes
        assert text.replace("</s>", "") == apply(tok, msgs, False, parts)
        assert text.count("</s>") == len([m for m in msgs if m["role"] == "assistant"])
    else:
        assert text == apply(tok, msgs, False)
    ex = check_tokens(tok, Record(id=kind, messages=msgs), t, text, bos, eot or "</s>")
    # The answer ends in the family's end-of-turn token, and generation stops on it.
    end_id = tok.convert_tokens_to_ids(eot or tok.eos_token)
    trained = [x for x in ex.labels if x != IGNORE_INDEX]
    assert trained[-1] == end_id
    assert end_id in stop_token_ids(tok, t)
    # Training sees exactly the inference prompt before the last answer.
    p_ids = tokenize_prompt(prompt, tok, t)
    assert ex.input_ids[: len(p_ids)] == p_ids


def test_llava_hf_processor_list_of_parts_with_image() -> None:
    tok = load("llava-1.5-7b-hf")
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(TOKENIZERS / "llava-1.5-7b-hf"))
    msgs = [{"role": "user", "content": "What is shown here?\n<image>"}, {"role": "assistant", "content": "A red square."},
            {"role": "user", "content": "<image>\nAnd now?"}, {"role": "assistant", "content": "A blue circle."}]
    parts_msgs = [dict(m, content=content_parts(m["content"])) for m in msgs]
    assert parts_msgs[0]["content"] == [{"type": "text", "text": "What is shown here?\n"}, {"type": "image"}]
    assert parts_msgs[2]["content"] == [{"type": "image"}, {"type": "text", "text": "And now?"}]
    t = get_template("tokenizer", tok)
    assert t.render_text(msgs[:1], add_generation_prompt=True) == \
        proc.apply_chat_template(parts_msgs[:1], add_generation_prompt=True, tokenize=False)
    assert t.render_text(msgs[:3], add_generation_prompt=True).replace("</s>", "") == \
        proc.apply_chat_template(parts_msgs[:3], add_generation_prompt=True, tokenize=False)
    rec = Record(id="img", messages=msgs, images=["a.png", "b.png"])
    ex = tokenize_record(rec, tok, t, max_length=4096, num_image_tokens=4)
    img = tok.convert_tokens_to_ids("<image>")
    assert ex.input_ids.count(img) == 8 and len(ex.image_spans) == 2
    runs = _runs(ex)
    assert [tok.decode(r).strip() for r in runs] == ["A red square.</s>", "A blue circle.</s>"]


def _runs(ex) -> list[list[int]]:
    runs, cur = [], []
    for lab in ex.labels:
        if lab != IGNORE_INDEX:
            cur.append(lab)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_llama2_chat_template_with_llama2_tokenizer() -> None:
    """Llama-2-chat: system prompt inside the first [INST], BOS before every turn, ' </s>' after answers."""
    tok = load("vicuna-7b-v1.5")
    saved = tok.chat_template
    tok.chat_template = (FIX / "llama2_chat.jinja").read_text()
    try:
        t = get_template("tokenizer", tok)
        text = t.render_text(SYSTEM)
        assert text == apply(tok, SYSTEM, False)
        assert text.startswith("<s>[INST] <<SYS>>\nAnswer in five words or fewer.\n<</SYS>>\n\nWhat colour")
        ex = tokenize_record(Record(id="l2", messages=SYSTEM), tok, t, max_length=4096)
        assert ex.input_ids[:2] != [1, 1] and ex.input_ids[0] == 1
        assert ex.input_ids.count(1) == 2  # the template writes <s> before each of the two turns
        assert [tok.decode(r) for r in _runs(ex)] == ["Blue, mostly. </s>", "Dark: black or deep navy. </s>"]
    finally:
        tok.chat_template = saved


def test_a_record_the_template_refuses_is_a_counted_skip() -> None:
    """Mistral's template raises on two user turns in a row: that record is skipped (named), not a crash."""
    from mmtune.data.encode import SkipRecord

    tok = load("mistral-7b-instruct-v0.3")
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(SkipRecord, match=r"record 'twice'.*template 'tokenizer'.*alternate") as err:
        tokenize_record(Record(id="twice", messages=msgs), tok, get_template("tokenizer", tok), max_length=512)
    assert err.value.kind == "template_error"


def test_unhandleable_template_is_refused_naming_it() -> None:
    tok = load("qwen2.5-instruct")
    saved = tok.chat_template
    # renders each answer twice (a "summary" line): no exact label span exists
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'recap: ' + m['content'] }}{% endif %}{% endfor %}")
    try:
        with pytest.raises(TemplateError, match=r"template 'tokenizer' \(chat_template of .*qwen2.5-instruct\).*rendered 2 times") as err:
            get_template("tokenizer", tok)  # refused up front, before any record
        assert "\n" not in str(err.value)
    finally:
        tok.chat_template = saved


# --------------------------------------------------------------------------- #
# Named templates with real tokenizers
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", list(RECORDS))
def test_vicuna_v1_with_vicuna_tokenizer(kind: str) -> None:
    """LLaVA-1.5's conv_vicuna_v1: 'SYSTEM USER: q ASSISTANT: a</s>USER: ...', one <s>, answers + </s> trained."""
    tok = load("vicuna-7b-v1.5")
    msgs = RECORDS[kind]
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else VICUNA_SYSTEM
    body = [m for m in msgs if m["role"] != "system"]
    expected = system + " " + "".join(
        f"USER: {m['content']} ASSISTANT:" if m["role"] == "user" else f" {m['content']}</s>" for m in body)
    t = get_template("vicuna_v1")
    assert t.render_text(msgs, eos_token=tok.eos_token) == expected
    ex = check_tokens(tok, Record(id=kind, messages=msgs), t, expected, "<s>", "</s>")
    assert 2 in stop_token_ids(tok, t)
    assert [x for x in ex.labels if x != IGNORE_INDEX][-1] == 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chatml_with_each_tokenizer(family: str) -> None:
    tok = load(family)
    bos = FAMILIES[family][0]
    t = get_template("chatml")
    text = t.render_text(SYSTEM, eos_token=tok.eos_token)
    if family == "qwen2.5-instruct":  # Qwen2.5's own template is ChatML when the record has a system turn
        assert text == apply(tok, SYSTEM, False)
    check_tokens(tok, Record(id="c", messages=SYSTEM), t, text, bos, "<|im_end|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if family == "qwen2.5-instruct":
        assert im_end in stop_token_ids(tok, t)
    else:  # not a token of these vocabularies: generation is cut at the stop string instead
        assert "<|im_end|>" in t.stop_strings


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_with_each_tokenizer(family: str) -> None:
    """LLaVA-1.5 stage 1: BOS, the image, the caption and '\\n'; only caption + '\\n' trained."""
    tok = load(family)
    bos = FAMILIES[family][0]
    msgs = [{"role": "user", "content": "Give a short caption.\n<image>"}, {"role": "assistant", "content": "A dog on a beach."}]
    t = get_template("plain")
    assert t.render_text(msgs) == "<image>A dog on a beach.\n"
    assert t.render_text(msgs[:1], add_generation_prompt=True) == "<image>"
    ex = tokenize_record(Record(id="p", messages=msgs, images=["x.png"]), tok, t, max_length=4096, num_image_tokens=3)
    img = tok.convert_tokens_to_ids("<image>")
    start = 1 if bos else 0
    if bos:
        assert ex.input_ids[0] == tok.convert_tokens_to_ids(bos) and ex.input_ids.count(ex.input_ids[0]) == 1
    assert ex.input_ids[start:start + 3] == [img] * 3
    assert ex.labels[: start + 3] == [IGNORE_INDEX] * (start + 3)
    assert ex.labels[start + 3:] == ex.input_ids[start + 3:]
    assert tok.decode(ex.input_ids[start + 3:]).strip() == "A dog on a beach."
    # the Jinja twin renders the same text, for string and list-of-parts content
    tok_copy_template = tok.chat_template
    try:
        tok.chat_template = t.chat_template()
        assert tok.apply_chat_template(msgs, tokenize=False) == "<image>A dog on a beach.\n"
        assert apply(tok, msgs, False, parts=True) == "<image>A dog on a beach.\n"
    finally:
        tok.chat_template = tok_copy_template


# --------------------------------------------------------------------------- #
# Generation stops on the family's end-of-turn token
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("family", ["qwen2.5-instruct", "llama-3.2-instruct", "mistral-7b-instruct-v0.3"])
def test_generation_stops_on_end_of_turn(family: str) -> None:
    """A tiny LM whose every step prefers the end-of-turn token stops after one token, not max_new_tokens."""
    from mmtune.config import ModelConfig
    from mmtune.model import build_model

    tok = load(family)
    t = get_template("tokenizer", tok)
    cfg = ModelConfig(mode="llm")
    cfg.lm.config = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": False}
    torch.manual_seed(0)
    bundle = build_model(cfg, tokenizer=tok)
    lm = bundle.model.lm
    eot = tok.convert_tokens_to_ids(FAMILIES[family][1])
    other = tok.convert_tokens_to_ids(tok.tokenize("ok")[0])
    head = torch.nn.Linear(8, lm.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eot] = 10.0
        head.bias[other] = 5.0
    lm.lm_head = head
    ids = torch.tensor([tokenize_prompt(SINGLE[:1], tok, t)])
    out = bundle.model.generate(ids, torch.ones_like(ids), max_new_tokens=6, eos_token_id=stop_token_ids(tok, t),
                                pad_token_id=tok.pad_token_id)
    assert out[0].tolist() == [eot]
    # control: with another stop id the same model runs to max_new_tokens
    out = bundle.model.generate(ids, torch.ones_like(ids), max_new_tokens=6, eos_token_id=[other],
                                pad_token_id=tok.pad_token_id)
    assert out.shape[1] == 6


@pytest.mark.parametrize("family", list(FAMILIES))
def test_direct_backend_encoding_equals_the_tokenizer_call(family: str) -> None:
    """The loader's fast path (the Rust backend's `encode`) gives exactly the ids and offsets of `tokenizer(...)`,
    with and without special tokens, on rendered conversations with images, BOS/EOS and non-ASCII text;
    and a backend left truncating falls back to the tokenizer call, so its ids stay untruncated."""
    from mmtune.data.encode import _backend, encode_with_offsets

    tok = load(family)
    assert _backend(tok) is not None, "released fast tokenizers take the direct path"
    texts = [apply(tok, m, False) for m in RECORDS.values()]
    texts += [f"{tok.bos_token or ''}USER: <image>\nWhat is this? ASSISTANT: A café, 東京 — ok.{tok.eos_token}",
              "  leading spaces\n\n<image>\n<image> two images\ttab", ""]
    for text in texts:
        for special in (True, False):
            ref = tok(text, add_special_tokens=special, return_offsets_mapping=True)
            ids, offsets = encode_with_offsets(text, tok, special)
            assert list(ids) == list(ref["input_ids"]), (family, text, special)
            assert [tuple(o) for o in offsets] == [tuple(o) for o in ref["offset_mapping"]], (family, text, special)
    backend = tok._tokenizer
    backend.enable_truncation(max_length=3)
    try:
        assert _backend(tok) is None
        long = texts[0]
        ids, _ = encode_with_offsets(long, tok, True)
        assert list(ids) == list(tok(long)["input_ids"]) and len(ids) > 3
    finally:
        backend.no_truncation()
