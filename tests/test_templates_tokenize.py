"""Templates render the published formats; loss masks are right token by token on real rows."""

import json
from pathlib import Path

import pytest

from mmtune.data.encode import (
    IGNORE_INDEX,
    SkipRecord,
    tokenize_prompt,
    tokenize_record,
)
from mmtune.data.schema import Record
from mmtune.data.templates import (
    ALPACA_PROMPT_INPUT,
    ALPACA_PROMPT_NO_INPUT,
    VICUNA_SYSTEM,
    few_shot,
    get_template,
    prompt_messages,
)
from mmtune.data.tokenizer import build_byte_bpe_tokenizer
from mmtune.errors import MMTuneError

FIX = Path(__file__).parent / "fixtures" / "tokenize"


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for r in _mllm_rows() for m in r.messages] + [r["output"] for r in _alpaca_raw()]
    return build_byte_bpe_tokenizer(texts * 3, vocab_size=400)


def _alpaca_raw() -> list[dict]:
    return json.loads((FIX / "alpaca_rows.json").read_text())


def _alpaca_records() -> list[Record]:
    out = []
    for i, row in enumerate(_alpaca_raw()):
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        out.append(Record(id=f"a{i}", messages=[{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}],
                          meta={"instruction": row["instruction"], "input": row["input"], "output": row["output"]}))
    return out


def _mllm_rows() -> list[Record]:
    rows = json.loads((FIX / "mllm_rows.json").read_text())
    return [Record(id=f"m{i}", messages=r["messages"], images=r["images"]) for i, r in enumerate(rows)]


def _trained_runs(ex) -> list[list[int]]:
    runs, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE_INDEX:
            assert lab == t, "a trained label must equal its input token"
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def test_alpaca_renders_stanford_format_exactly() -> None:
    no_inp, with_inp = _alpaca_raw()
    t = get_template("alpaca")
    recs = _alpaca_records()
    assert t.render_text(prompt_messages(recs[0]), add_generation_prompt=True, meta=recs[0].meta) == \
        ALPACA_PROMPT_NO_INPUT.format(instruction=no_inp["instruction"])
    assert t.render_text(prompt_messages(recs[1]), add_generation_prompt=True, meta=recs[1].meta) == \
        ALPACA_PROMPT_INPUT.format(instruction=with_inp["instruction"], input=with_inp["input"])


@pytest.mark.parametrize("row", [0, 1])
def test_alpaca_mask_token_by_token(tok, row: int) -> None:
    rec = _alpaca_records()[row]
    t = get_template("alpaca")
    ex = tokenize_record(rec, tok, t, max_length=4096)
    prompt_ids = tokenize_prompt(prompt_messages(rec), tok, t, meta=rec.meta)
    n = len(prompt_ids)
    assert ex.input_ids[:n] == prompt_ids  # training sees exactly the inference prompt
    assert all(lab == IGNORE_INDEX for lab in ex.labels[:n])
    assert ex.labels[n:] == ex.input_ids[n:]
    assert tok.decode(ex.input_ids[n:]) == rec.meta["output"] + tok.eos_token


def test_llava_style_multiturn_mask(tok) -> None:
    rec = _mllm_rows()[0]  # two turns, two images (one after the text)
    t = get_template("vicuna_v1")
    ex = tokenize_record(rec, tok, t, max_length=4096, num_image_tokens=5)
    runs = _trained_runs(ex)
    answers = rec.turns("assistant")
    assert [tok.decode(r) for r in runs] == [f" {a}{tok.eos_token}" for a in answers]
    img_id = tok.convert_tokens_to_ids("<image>")
    assert len(ex.image_spans) == 2
    for a, b in ex.image_spans:
        assert b - a == 5 and ex.input_ids[a:b] == [img_id] * 5
        assert ex.labels[a:b] == [IGNORE_INDEX] * 5
    assert sum(1 for t_ in ex.input_ids if t_ == img_id) == 10
    text = tok.decode(ex.input_ids)
    assert text.startswith(VICUNA_SYSTEM + " USER: <image>")
    assert "ASSISTANT: They're Kane" in text


def test_every_template_trains_only_assistant_text(tok) -> None:
    rec = _mllm_rows()[1]
    for name in ("vicuna_v1", "chatml", "alpaca"):
        ex = tokenize_record(rec, tok, get_template(name), max_length=4096, num_image_tokens=3)
        trained = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])
        for answer in rec.turns("assistant"):
            assert answer in trained
        for question in rec.turns("user"):
            assert question.replace("<image>", "") not in trained


def test_jinja_matches_python_renderer(tok) -> None:
    rec = _mllm_rows()[1]
    for name in ("vicuna_v1", "chatml"):
        t = get_template(name)
        tok.chat_template = t.chat_template()
        assert tok.apply_chat_template(rec.messages, tokenize=False) == t.render_text(rec.messages, eos_token=tok.eos_token)
        prompt = prompt_messages(rec)
        assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == \
            t.render_text(prompt, add_generation_prompt=True, eos_token=tok.eos_token)
    # Processor-style content (a list of image/text items) renders the same prompt.
    t = get_template("vicuna_v1")
    tok.chat_template = t.chat_template()
    items = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert tok.apply_chat_template(items, tokenize=False, add_generation_prompt=True) == \
        t.render_text([{"role": "user", "content": "<image>\nWhat is it?"}], add_generation_prompt=True)


def test_tokenizer_template_matches_named_template(tok) -> None:
    rec = _mllm_rows()[0]
    tok.chat_template = get_template("chatml").chat_template()
    named = tokenize_record(rec, tok, get_template("chatml"), max_length=4096, num_image_tokens=2)
    own = tokenize_record(rec, tok, get_template("tokenizer", tok), max_length=4096, num_image_tokens=2)
    assert own.input_ids == named.input_ids
    # chatml trains the content and <|im_end|>; the tokenizer template trains what the prefix diff gives
    assert [tok.decode(r) for r in _trained_runs(own)][0].startswith("They're Kane")


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_truncation_never_cuts_an_image(tok, where: str) -> None:
    words = " ".join(["word"] * 60)
    content = {"start": f"<image>\n{words}", "middle": f"{words} <image> {words}", "end": f"{words} <image>"}[where]
    rec = Record(id=where, messages=[{"role": "user", "content": content}, {"role": "assistant", "content": "yes " * 40}], images=["x.png"])
    full = tokenize_record(rec, tok, get_template("chatml"), max_length=10_000, num_image_tokens=8)
    limit = len(full) - 30
    ex = tokenize_record(rec, tok, get_template("chatml"), max_length=limit, num_image_tokens=8)
    assert len(ex) == limit and ex.truncated_tokens == 30
    (a, b), = ex.image_spans
    img_id = tok.convert_tokens_to_ids("<image>")
    assert ex.input_ids[a:b] == [img_id] * 8
    assert sum(1 for t in ex.input_ids if t == img_id) == 8
    assert ex.num_trained > 0


def test_skip_when_nothing_trainable_or_images_do_not_fit(tok) -> None:
    rec = Record(id="long", messages=[{"role": "user", "content": "<image>\n" + "word " * 200}, {"role": "assistant", "content": "ok"}], images=["x.png"])
    with pytest.raises(SkipRecord) as info:
        tokenize_record(rec, tok, get_template("vicuna_v1"), max_length=100, num_image_tokens=8)
    assert info.value.kind == "no_trainable_tokens" and "'long'" in str(info.value)
    two = Record(id="two", messages=[{"role": "user", "content": "<image><image> hi"}, {"role": "assistant", "content": "ok"}], images=["a", "b"])
    with pytest.raises(SkipRecord) as info:
        tokenize_record(two, tok, get_template("vicuna_v1"), max_length=10, num_image_tokens=8)
    assert info.value.kind == "images_exceed_max_length"


def test_few_shot_prepends_solved_examples(tok) -> None:
    ex1 = Record(id="e1", messages=[{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}], images=["e1.png"])
    ex2 = Record(id="e2", messages=[{"role": "user", "content": "Shape?"}], answers=["circle", "round"])
    q = Record(id="q", messages=[{"role": "user", "content": "<image>\nCount?"}, {"role": "assistant", "content": "3"}], images=["q.png"], answers=["3"])
    fs = few_shot(q, [ex1, ex2], instruction_suffix=" Answer briefly.")
    assert [m["role"] for m in fs.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert fs.messages[3]["content"] == "circle" and fs.messages[-1]["content"].endswith("Answer briefly.")
    assert fs.images == ["e1.png", "q.png"] and fs.answers == ["3"]
    ids = tokenize_prompt(fs.messages, tok, get_template("vicuna_v1"), num_image_tokens=4, num_images=len(fs.images))
    assert sum(1 for t in ids if t == tok.convert_tokens_to_ids("<image>")) == 8
    with pytest.raises(MMTuneError, match="no user turn or no answer"):
        few_shot(q, [Record(id="bad", messages=[{"role": "user", "content": "x"}])])


def test_unknown_template_suggests() -> None:
    with pytest.raises(MMTuneError, match="did you mean 'chatml'"):
        get_template("chatm")


def test_prepare_tokenizer_keeps_existing_special_tokens() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mmtune.data.tokenizer import prepare_tokenizer

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok = prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>",
                                                    additional_special_tokens=["<|im_end|>"]))
    # the model's own end-of-turn token must stay special (generation stops on it)
    assert {"<|im_end|>", "<image>", "</s>"} <= set(tok.all_special_tokens)
    assert tok.pad_token is not None
    assert len(tok("<image>", add_special_tokens=False)["input_ids"]) == 1
