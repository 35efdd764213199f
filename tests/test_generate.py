"""mmtune.eval.generate: batched KV-cached generation and the `mmtune generate` CLI, on tiny models."""

from __future__ import annotations

import pytest
import torch
from helpers import TRAIN_FIX as FIX
from helpers import build_tiny, save_run

from mmtune.cli import main
from mmtune.data.collate import pad_sequences
from mmtune.data.encode import tokenize_prompt
from mmtune.data.schema import Record, read_records
from mmtune.data.templates import get_template
from mmtune.eval.generate import generate_answers
from mmtune.model import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str, seed: int = 0):
    """A tiny model whose random weights are large enough that greedy outputs vary by prompt."""
    return build_tiny(name, seed, initializer_range=0.5)


@pytest.fixture(scope="module")
def mllm():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    bundle, cfg = tiny("tiny_mllm")
    torch.set_num_threads(n)
    return bundle, cfg


def test_batched_greedy_equals_one_at_a_time(mllm):
    bundle, _ = mllm
    recs = read_records(FIX / "mixed.jsonl")
    items = [recs[i] for i in (0, 1, 14, 15, 16, 20)] + ["Name a colour.", "What shape has three sides?"]
    batched = generate_answers(bundle, items, "vicuna_v1", batch_size=8, max_new_tokens=8, image_root=FIX)
    single = [
        generate_answers(bundle, [it], "vicuna_v1", batch_size=1, max_new_tokens=8, image_root=FIX)[0] for it in items
    ]
    assert batched == single
    assert len(set(batched)) > 2  # the prompts really lead to different answers

    # and token for token at the model level, on left-padded prompts of different lengths
    tok, tmpl = bundle.tokenizer, get_template("vicuna_v1")
    prompts = [
        [{"role": "user", "content": "<image>\nWhat colour is the shape?"}],
        [{"role": "user", "content": "Mixing red and blue gives which colour, in one word please?"}],
    ]
    ids = [tokenize_prompt(m, tok, tmpl, num_image_tokens=bundle.num_image_tokens) for m in prompts]
    assert len(ids[0]) != len(ids[1])
    from mmtune.data.images import load_image

    pix = bundle.image_transform(load_image(FIX / "images/blue_square.png")).unsqueeze(0)
    model = bundle.model.eval()
    kw = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=tok.pad_token_id)
    both = model.generate(
        pad_sequences(ids, tok.pad_token_id, side="left"),
        pad_sequences([[1] * len(i) for i in ids], 0, side="left"),
        pixel_values=pix,
        **kw,
    )
    one = model.generate(torch.tensor([ids[0]]), torch.ones(1, len(ids[0]), dtype=torch.long), pixel_values=pix, **kw)
    two = model.generate(torch.tensor([ids[1]]), torch.ones(1, len(ids[1]), dtype=torch.long), **kw)
    assert both.shape == (2, 6)  # new tokens only
    assert torch.equal(both[0], one[0]) and torch.equal(both[1], two[0])
    # KV-cached decoding gives what a full recomputation at every step gives
    seq, mask = torch.tensor([ids[1]]), torch.ones(1, len(ids[1]), dtype=torch.long)
    for _ in range(6):
        with torch.no_grad():
            nxt = model(seq, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        seq, mask = torch.cat([seq, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(seq[0, len(ids[1]) :], two[0])


def test_sampling_is_seeded_and_rejects_right_padding(mllm):
    bundle, _ = mllm
    kw = dict(do_sample=True, temperature=1.5, top_p=0.9, max_new_tokens=8, seed=123)
    a = generate_answers(bundle, ["Name a colour.", "Name a shape."], "chatml", **kw)
    b = generate_answers(bundle, ["Name a colour.", "Name a shape."], "chatml", **kw)
    assert a == b
    from mmtune.errors import MMTuneError

    with pytest.raises(MMTuneError, match="left-padded"):
        bundle.model.generate(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]))
    with pytest.raises(MMTuneError, match="nope.png"):
        generate_answers(
            bundle,
            [Record("r1", [{"role": "user", "content": "<image>\nhi"}], ["nope.png"])],
            "vicuna_v1",
            image_root=FIX,
        )


def test_generate_cli_end_to_end_with_image(tmp_path, capsys, mllm):
    bundle, cfg = mllm
    save_run(bundle, cfg, tmp_path / "run", 2, "vicuna_v1")
    other, _ = tiny("tiny_mllm", seed=1)
    latest = save_run(other, cfg, tmp_path / "run", 10, "chatml")
    image = FIX / "images/green_triangle.png"
    request = ["--image", str(image), "--prompt", "What shape is this?", "--max-new-tokens", "6", "--device", "cpu"]
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), *request]) == 0
    captured = capsys.readouterr()
    printed = captured.out.rstrip("\n").split("\n")[-1]
    assert "checkpoint-10" in captured.err and "chatml" in captured.err
    # the same answer generate_answers gives on the latest checkpoint with its trained template
    rec = Record("x", [{"role": "user", "content": "<image>\nWhat shape is this?"}], [str(image)])
    expected = generate_answers(load_model(latest), [rec], "chatml", max_new_tokens=6)[0]
    assert printed == expected
    # --template overrides the trained one; an explicit checkpoint folder works too
    assert main(["generate", str(latest), *request, "--template", "vicuna_v1"]) == 0
    out = capsys.readouterr().out.rstrip("\n").split("\n")[-1]
    assert out == generate_answers(load_model(latest), [rec], "vicuna_v1", max_new_tokens=6)[0]


def test_generate_cli_text_only_and_errors(tmp_path, capsys):
    llm, cfg = tiny("tiny_llm")
    ckpt = save_run(llm, cfg, tmp_path / "run", 3, "vicuna_v1")
    capsys.readouterr()
    assert (
        main(["generate", str(ckpt), "--prompt", "What colour is grass?", "--max-new-tokens", "5", "--device", "cpu"])
        == 0
    )
    printed = capsys.readouterr().out.rstrip("\n").split("\n")[-1]
    assert printed == generate_answers(llm, ["What colour is grass?"], "vicuna_v1", max_new_tokens=5)[0]
    image = str(FIX / "images/red_circle.png")
    bad = [
        ["generate", str(ckpt), "--prompt", "hi", "--image", image],  # text-only model
        ["generate", str(tmp_path / "nowhere"), "--prompt", "hi"],
        ["generate", str(ckpt), "--prompt", "hi", "--image", str(tmp_path / "missing.png")],
        ["generate", str(ckpt), "--prompt", "<image> <image> two?", "--image", image],
        ["generate", str(ckpt), "--prompt", "hi", "--template", "vicunaa"],
    ]
    for argv in bad:
        assert main(argv + ["--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("mmtune generate: error:"), err


def test_generation_through_a_lora_wrapped_lm_matches_merged():
    from mmtune.config import LoraConfig
    from mmtune.model import apply_lora, merge_lora

    bundle, cfg = tiny("tiny_mllm", seed=2)
    apply_lora(bundle.model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # give the adapter a visible effect (B starts at zero)
        for n, p in bundle.model.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    recs = read_records(FIX / "mixed.jsonl")[:4] + ["Name a colour."]
    wrapped = generate_answers(bundle, recs, "vicuna_v1", batch_size=5, max_new_tokens=6, image_root=FIX)
    with bundle.model.lm.disable_adapter():
        base = generate_answers(bundle, recs, "vicuna_v1", batch_size=5, max_new_tokens=6, image_root=FIX)
    assert base != wrapped  # the adapter changes what is generated
    merge_lora(bundle.model)
    merged = generate_answers(bundle, recs, "vicuna_v1", batch_size=5, max_new_tokens=6, image_root=FIX)
    assert wrapped == merged


def test_generate_batch_file_in_input_order(tmp_path, capsys, mllm):
    import json

    bundle, cfg = mllm
    save_run(bundle, cfg, tmp_path / "run", 1, "vicuna_v1")
    recs = read_records(FIX / "mixed.jsonl")
    lines = [
        json.dumps({"prompt": "What colour is grass? Answer with a long sentence please."}),
        recs[14].to_json(),  # a unified record, image path relative to --image-root
        json.dumps({"id": "tri", "prompt": "What shape is this?", "image": "images/green_triangle.png"}),
        "{not json",
        json.dumps({"prompt": "Name it.", "image": "images/missing.png"}),
        json.dumps({"prompt": "Hi"}),
        recs[0].to_json(),
    ]
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    argv = ["generate", str(tmp_path / "run"), "--input", str(src), "--out", str(out), "--batch-size", "3",
            "--max-new-tokens", "6", "--device", "cpu", "--image-root", str(FIX), "--no-progress"]
    assert main(argv) == 0
    assert "answered 5, errors 2" in capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["prompts-1", recs[14].id, "tri", "prompts-4", "prompts-5", "prompts-6",
                                       recs[0].id]
    assert "bad JSON" in rows[3]["error"] and f"{src}:4" in rows[3]["error"]
    assert "missing.png" in rows[4]["error"] and "answer" not in rows[4]
    # each answer is what one-at-a-time generation gives for that line (the batch is sorted by length inside)
    tri = Record("tri", [{"role": "user", "content": "<image>\nWhat shape is this?"}], ["images/green_triangle.png"])
    singles = [generate_answers(bundle, [it], "vicuna_v1", batch_size=1, max_new_tokens=6, image_root=FIX)[0]
               for it in ["What colour is grass? Answer with a long sentence please.", recs[14], tri, "Hi", recs[0]]]
    assert [rows[i]["answer"] for i in (0, 1, 2, 5, 6)] == singles
    assert len(set(singles)) > 2
    # --prompt and --input together (or neither) is a one-line error
    assert main(["generate", str(tmp_path / "run"), "--prompt", "x", "--input", str(src), "--out", str(out)]) == 2
    assert main(["generate", str(tmp_path / "run"), "--input", str(src)]) == 2
