"""Batcher: plain, length-grouped and packed batches; packed loss == unpacked loss; exact resume."""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mmtune.data.batching import Batcher, collate_packed, model_inputs, pack_rows
from mmtune.data.collate import collate_examples
from mmtune.data.encode import IGNORE_INDEX, image_token_id
from mmtune.data.schema import Record, write_records
from mmtune.data.stream import ExampleStream
from mmtune.data.tokenizer import build_byte_bpe_tokenizer, record_texts
from mmtune.errors import MMTuneError

N_IMG = 2
MAX_LEN = 96


def red(img: Image.Image) -> torch.Tensor:
    """A 2x2 tensor whose every value is the image's red level: images stay identifiable."""
    arr = np.asarray(img.resize((2, 2)), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("batching")
    recs: list[Record] = []
    reds: dict[str, list[float]] = {}
    for i in range(36):
        words = " ".join(f"w{(i * 7 + k) % 13}" for k in range(1 + (i * 5) % 17))
        if i % 4 == 0:  # an image record, every fourth with two images
            n = 1 + (i % 8 == 0)
            paths = []
            for j in range(n):
                path = tmp / f"img{i}_{j}.png"
                Image.new("RGB", (5, 4), (i * 6 + j, 9, 9)).save(path)
                paths.append(str(path))
            reds[f"r{i}"] = [float(i * 6 + j) for j in range(n)]
            content = "<image>" * n + f"what is in it {words}?"
        else:
            paths, content = [], f"repeat {words}"
            reds[f"r{i}"] = []
        recs.append(Record(f"r{i}", [{"role": "user", "content": content}, {"role": "assistant", "content": words}], paths))
    path = tmp / "records.jsonl"
    write_records(recs, path)
    tok = build_byte_bpe_tokenizer(list(record_texts(recs)), 300)
    return {"path": str(path), "tok": tok, "reds": reds, "n": len(recs)}


def stream(data: dict[str, Any], **kw: Any) -> ExampleStream:
    args = dict(max_length=MAX_LEN, num_image_tokens=N_IMG, image_transform=red, shuffle_buffer=8, seed=5,
                epochs=1, rank=0, world_size=1)
    args.update(kw)
    return ExampleStream(data["path"], data["tok"], "chatml", **args)


def check_pixels(batch: dict[str, Any], reds: dict[str, list[float]]) -> None:
    want = [v for rid in batch["ids"] for v in reds[rid]]
    assert batch["num_images"] == [len(reds[rid]) for rid in batch["ids"]]
    if not want:
        assert "pixel_values" not in batch
        return
    got = batch["pixel_values"][:, 0, 0, 0].tolist()
    assert got == want  # reading order: row by row, left to right


def test_plain_batches_keep_stream_order_and_image_order(data: dict[str, Any]) -> None:
    order = [ex.id for ex, _ in stream(data)]
    batches = list(Batcher(stream(data), batch_size=4, group_by_length=False))
    assert [i for b in batches for i in b["ids"]] == order and len(order) == data["n"]
    assert [len(b["ids"]) for b in batches] == [4] * 9
    for b in batches:
        check_pixels(b, data["reds"])
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
        inputs = model_inputs(b)
        assert "ids" not in inputs and "attention_mask" in inputs and "position_ids" not in inputs


def test_length_grouping_cuts_padding_and_stays_seeded(data: dict[str, Any]) -> None:
    plain = Batcher(stream(data), batch_size=4, group_by_length=False)
    list(plain)
    grouped = Batcher(stream(data), batch_size=4, group_factor=4, seed=1)
    batches = list(grouped)
    ids = [i for b in batches for i in b["ids"]]
    assert sorted(ids) == sorted(f"r{i}" for i in range(data["n"]))
    assert grouped.padding_share < plain.padding_share / 2
    lengths = {ex.id: len(ex) for ex, _ in stream(data)}
    for start in range(0, 9, 4):  # each buffer of 16 examples is sorted, then its batches shuffled
        group = sorted(batches[start: start + 4], key=lambda b: min(lengths[i] for i in b["ids"]))
        for a, b in itertools.pairwise(group):
            assert max(lengths[i] for i in a["ids"]) <= min(lengths[i] for i in b["ids"])
    for b in batches:
        check_pixels(b, data["reds"])
    again = [b["ids"] for b in Batcher(stream(data), batch_size=4, group_factor=4, seed=1)]
    other = [b["ids"] for b in Batcher(stream(data), batch_size=4, group_factor=4, seed=2)]
    assert again == [b["ids"] for b in batches] and other != again


def test_packing_layout_keeps_examples_and_image_runs_whole(data: dict[str, Any]) -> None:
    examples = {ex.id: ex for ex, _ in stream(data)}
    img_id = image_token_id(data["tok"])
    b = Batcher(stream(data), batch_size=2, group_factor=8, packing=True, pack_length=2 * MAX_LEN)
    batches = list(b)
    assert sum(len(x["ids"]) for x in batches) == data["n"]
    assert b.padding_share < 0.15
    for batch in batches:
        check_pixels(batch, data["reds"])
        pos, ids, labels = batch["position_ids"], batch["input_ids"], batch["labels"]
        assert ids.shape[1] <= 2 * MAX_LEN
        rebuilt: list[str] = []
        for r in range(ids.shape[0]):
            n_real = int(batch["attention_mask"][r].sum())
            starts = [t for t in range(n_real) if pos[r, t] == 0] + [n_real]
            for a, z in itertools.pairwise(starts):
                seg = ids[r, a:z].tolist()
                ex = next(e for e in examples.values() if e.input_ids == seg)
                rebuilt.append(ex.id)
                assert labels[r, a] == IGNORE_INDEX and labels[r, a + 1: z].tolist() == ex.labels[1:]
                assert pos[r, a:z].tolist() == list(range(z - a))
                at = [t for t, v in enumerate(seg) if v == img_id]  # image runs intact, where tokenization put them
                assert at == [t for s0, s1 in ex.image_spans for t in range(s0, s1)]
                assert all(s1 - s0 == N_IMG for s0, s1 in ex.image_spans)
        assert rebuilt == batch["ids"]
    inputs = model_inputs(batches[0])
    assert "attention_mask" not in inputs and inputs["use_cache"] is False
    with pytest.raises(MMTuneError, match="pack_length"):
        Batcher(stream(data), batch_size=2, packing=True, pack_length=MAX_LEN // 2)


def test_pack_rows_first_fit_decreasing() -> None:
    assert pack_rows([5, 3, 8, 2, 2], 10) == [[2, 3], [0, 1, 4]]
    with pytest.raises(MMTuneError):
        pack_rows([11], 10)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_token_weighted_unpacked_loss(data: dict[str, Any], attn: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    # a plain LM: text records only (the image records are skipped and counted in llm mode)
    examples = [ex for ex, _ in itertools.islice(stream(data, num_image_tokens=0, image_transform=None), 12)]
    tok = data["tok"]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * MAX_LEN,
                      initializer_range=0.2)  # wide init: attention that crosses examples shows clearly
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    unpacked = collate_examples(examples, tok.pad_token_id)
    rows = [[examples[i] for i in row] for row in pack_rows([len(e) for e in examples], 3 * MAX_LEN)]
    assert len(rows) < len(examples) and max(len(r) for r in rows) >= 3
    packed = collate_packed(rows, tok.pad_token_id)
    with torch.no_grad():
        loss_u = model(**model_inputs(unpacked)).loss
        out_p = model(**model_inputs(packed))
        loss_p = out_p.loss
        # control: the same packed rows with a plain 2D mask let attention cross examples
        crossed = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                        position_ids=packed["position_ids"], labels=packed["labels"], use_cache=False)
    assert unpacked["labels"].ne(IGNORE_INDEX).sum() == packed["labels"].ne(IGNORE_INDEX).sum()
    assert torch.allclose(loss_p, loss_u, atol=1e-5, rtol=1e-5), (loss_p.item(), loss_u.item())
    trained = packed["labels"].ne(IGNORE_INDEX)
    assert (crossed.logits - out_p.logits)[trained].abs().max() > 1e-2


def sig(batch: dict[str, Any]) -> tuple[Any, ...]:
    return (tuple(batch["ids"]), batch["input_ids"].numpy().tobytes(), batch["labels"].numpy().tobytes(),
            float(batch["pixel_values"].sum()) if "pixel_values" in batch else None,
            batch["position_ids"].numpy().tobytes() if "position_ids" in batch else None)


def test_group_by_modality_keeps_image_and_text_batches_apart(data: dict[str, Any]) -> None:
    """LLaVA-1.5's group_by_modality_length: no batch mixes the kinds, except the leftovers' batch."""
    b = Batcher(stream(data), batch_size=4, group_factor=9, seed=3, group_by_modality=True)
    batches = list(b)
    has_img = {rid: bool(r) for rid, r in data["reds"].items()}
    mixed = [x["ids"] for x in batches if len({has_img[i] for i in x["ids"]}) > 1]
    assert len(mixed) <= 1  # 36 = 9 image + 27 text records: 1 + 3 leftovers share one batch
    assert sorted(i for x in batches for i in x["ids"]) == sorted(data["reds"])
    assert sum(1 for x in batches if all(has_img[i] for i in x["ids"])) == 2
    # control: plain length grouping does mix the kinds
    plain = Batcher(stream(data), batch_size=4, group_factor=9, seed=3)
    assert sum(1 for x in plain if len({has_img[i] for i in x["ids"]}) > 1) > 1
    assert Batcher.from_config(stream(data), __import__("mmtune.config").config.DataConfig(group_by_modality=True),
                               batch_size=4).group_by_modality


@pytest.mark.parametrize("kw", [dict(group_by_length=False), dict(group_factor=3), dict(group_by_modality=True),
                                dict(packing=True, group_factor=4, pack_length=2 * MAX_LEN)])
def test_resume_gives_exactly_the_remaining_batches(data: dict[str, Any], kw: dict[str, Any]) -> None:
    make = lambda: Batcher(stream(data, epochs=2), batch_size=3, seed=9, **kw)
    full_b = make()
    full = [sig(b) for b in full_b]
    for k in (0, 1, 4, len(full) // 2 + 1, len(full) - 1, len(full)):
        b = make()
        head = [sig(x) for x in itertools.islice(iter(b), k)]
        state = json.loads(json.dumps(b.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        assert head + [sig(x) for x in resumed] == full, k
        assert resumed.stats == full_b.stats
    with pytest.raises(MMTuneError, match="settings"):
        Batcher(stream(data, epochs=2), batch_size=4, seed=9, **kw).load_state_dict(state)


def test_drop_last_counts_what_it_drops(data: dict[str, Any]) -> None:
    b = Batcher(stream(data), batch_size=5, group_by_length=False, drop_last=True)
    assert [len(x["ids"]) for x in b] == [5] * 7
    assert b.stats["dropped_examples"] == 1 and b.stats["examples"] == 35


def test_from_config_follows_the_data_section(data: dict[str, Any]) -> None:
    from mmtune.config import DataConfig

    b = Batcher.from_config(stream(data), DataConfig(packing=True, max_length=2 * MAX_LEN), batch_size=2)
    assert b.packing and b.pack_length == 2 * MAX_LEN
    assert "position_ids" in next(iter(b))
    plain = Batcher.from_config(stream(data), DataConfig(group_by_length=False), batch_size=2)
    assert not plain.group_by_length and not plain.packing and plain.buffer_size == 2


def test_collate_pads_ids_labels_and_mask_on_either_side() -> None:
    from mmtune.data.collate import collate_examples
    from mmtune.data.encode import TokenizedExample

    exs = [TokenizedExample("a", [1, 2, 3], [1, 2, 3]), TokenizedExample("b", [4], [4]),
           TokenizedExample("c", [5, 6], [-100, 6])]
    right = collate_examples(exs, 0)
    assert right["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert right["labels"].tolist() == [[1, 2, 3], [4, -100, -100], [-100, 6, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    left = collate_examples(exs, 0, side="left")
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert all(t.dtype == torch.long for t in right.values())
