"""ExampleStream: determinism, splits, counted skips and exact resumption (JSONL and shards)."""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

import mmtune.data.stream as stream_mod
from mmtune.data.schema import Record, read_records, write_records
from mmtune.data.shards import write_shards
from mmtune.data.stream import ExampleStream
from mmtune.data.tokenizer import build_byte_bpe_tokenizer, record_texts
from mmtune.errors import MMTuneError

FIX = Path(__file__).parent / "fixtures" / "shards"
N_IMG_TOKENS = 3


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((4, 4)), dtype=np.float32)).permute(2, 0, 1) / 255.0


def make_records(tmp: Path) -> list[Record]:
    """6 real image chats, 24 short text records (two tasks), and records that must be skipped."""
    recs = read_records(FIX / "mllm_records.jsonl")
    for r in recs:
        r.images = [str(FIX / p) for p in r.images]
    for i in range(24):
        task = "add" if i % 2 else "upper"
        recs.append(Record(f"t{i}", [{"role": "user", "content": f"{task} {i} and {i + 1}"},
                                     {"role": "assistant", "content": f"answer {i}" + " x" * (i % 5)}], task=task))
    recs.append(Record("held", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], task="secret"))
    recs.append(Record("noimg", [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
                       [str(tmp / "missing.jpg")]))
    bad = tmp / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    recs.append(Record("badimg", [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}], [str(bad)]))
    recs.append(Record("toolong", [{"role": "user", "content": "z " * 600}, {"role": "assistant", "content": "a"}]))
    return recs


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("stream")
    recs = make_records(tmp)
    jsonl = tmp / "records.jsonl"
    write_records(recs, jsonl)
    with jsonl.open("a") as fh:
        fh.write("{broken json\n")
    # shards hold every record whose images exist (the writer rejects the others, counted)
    shard_dir = tmp / "shards"
    summary = write_shards(jsonl, shard_dir, max_count=5)
    assert summary.rejects == 3  # missing image, broken image, broken JSON line
    # the same shards with one cut short (an interrupted copy): 5 samples written, fewer readable
    broken = tmp / "broken"
    shutil.copytree(shard_dir, broken)
    cut = broken / "shard-000002.tar"
    cut.write_bytes(cut.read_bytes()[: int(cut.stat().st_size * 0.45)])
    tok = build_byte_bpe_tokenizer(list(record_texts(recs)), 400)
    return {"recs": recs, "jsonl": str(jsonl), "shards": str(shard_dir), "broken": str(broken), "tok": tok, "tmp": tmp}


def make_stream(data: dict[str, Any], source: str, **kw: Any) -> ExampleStream:
    args = dict(max_length=256, num_image_tokens=N_IMG_TOKENS, image_transform=to_tensor, shuffle_buffer=4,
                seed=3, epochs=2, holdout_tasks=["secret"], rank=0, world_size=1)
    args.update(kw)
    return ExampleStream([source], data["tok"], "vicuna_v1", **args)


def sig(item: tuple[Any, list[torch.Tensor]]) -> tuple[Any, ...]:
    ex, images = item
    return (ex.id, tuple(ex.input_ids), tuple(ex.labels), tuple(ex.image_spans),
            tuple(tuple(t.flatten().tolist()) for t in images))


@pytest.mark.parametrize("which", ["jsonl", "shards"])
def test_deterministic_epochs_cover_everything_once(data: dict[str, Any], which: str) -> None:
    a = [sig(x) for x in make_stream(data, data[which])]
    b = [sig(x) for x in make_stream(data, data[which])]
    c = [sig(x) for x in make_stream(data, data[which], seed=4)]
    assert a == b and a != c and sorted(a) == sorted(c)
    usable = 30  # 6 image chats + 24 text records
    assert len(a) == 2 * usable
    first, second = [x[0] for x in a[:usable]], [x[0] for x in a[usable:]]
    assert sorted(first) == sorted(second) and len(set(first)) == usable and first != second
    ex = next(iter(make_stream(data, data[which], shuffle=False)))
    assert ex[0].id == "mllm_demo-0" and len(ex[1]) == 2 and ex[1][0].shape == (3, 4, 4)
    assert [b - a for a, b in ex[0].image_spans] == [N_IMG_TOKENS, N_IMG_TOKENS]


def test_skips_are_counted_by_kind_and_logged_with_ids(data: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    s = make_stream(data, data["jsonl"], epochs=1)
    with caplog.at_level(logging.WARNING, logger="mmtune.data.stream"):
        n = sum(1 for _ in s)
    assert n == 30
    assert s.skip_counts == {"holdout_task": 1, "image_error": 2, "invalid_record": 1, "no_trainable_tokens": 1}
    for rid in ("'held'", "'noimg'", "'badimg'", "'toolong'", "bad JSON"):
        assert rid in caplog.text
    # llm mode: image records are skipped and counted, not crashed on
    llm = make_stream(data, data["jsonl"], epochs=1, num_image_tokens=0, image_transform=None)
    assert sum(1 for _ in llm) == 24 and llm.skip_counts["images_in_llm_mode"] == 8


@pytest.mark.parametrize("which", ["jsonl", "shards", "broken"])
def test_resume_continues_with_exactly_the_next_example(data: dict[str, Any], which: str) -> None:
    full_stream = make_stream(data, data[which])
    full = [sig(x) for x in full_stream]
    for n in (0, 1, 7, 29, 30, 31, 45, 60):
        s = make_stream(data, data[which])
        head = [sig(x) for x in itertools.islice(iter(s), n)]
        state = json.loads(json.dumps(s.state_dict()))  # what a checkpoint stores
        resumed = make_stream(data, data[which])
        resumed.load_state_dict(state)
        rest = [sig(x) for x in resumed]
        assert head + rest == full, n
        assert resumed.skip_counts == full_stream.skip_counts
        assert resumed.examples_yielded == len(full)


def test_resume_does_not_tokenize_or_decode_the_skipped_prefix(data: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"tok": 0, "img": 0}
    real_tok, real_img = stream_mod.tokenize_record, stream_mod.load_image

    def counting_tok(*a: Any, **k: Any) -> Any:
        calls["tok"] += 1
        return real_tok(*a, **k)

    def counting_img(*a: Any, **k: Any) -> Any:
        calls["img"] += 1
        return real_img(*a, **k)

    s = make_stream(data, data["shards"], epochs=1, shuffle=False)
    list(itertools.islice(iter(s), 20))
    state = s.state_dict()
    monkeypatch.setattr(stream_mod, "tokenize_record", counting_tok)
    monkeypatch.setattr(stream_mod, "load_image", counting_img)
    resumed = make_stream(data, data["shards"], epochs=1, shuffle=False)
    resumed.load_state_dict(state)
    rest = list(resumed)
    # shard order without shuffle: the 6 image chats come first, so the rest is text only
    assert len(rest) == 10 and calls["img"] == 0
    assert calls["tok"] == 10 + 1  # the remaining records and the one that is skipped as too long


def test_truncated_shard_is_skipped_with_a_named_warning_and_counted(data: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mmtune.data.stream"):
        s = make_stream(data, data["broken"], epochs=1)
        got = [x[0].id for x in s]
    lost = s.skip_counts["shard_lost"]
    assert 1 <= lost <= 5 and len(got) == 30 - lost
    assert "shard-000002.tar" in caplog.text and f"{lost} of 5 samples lost" in caplog.text
    for world in (2, 8):  # split by shard, and by sample (7 shards < 8 ranks): losses counted once
        streams = [make_stream(data, data["broken"], epochs=1, rank=r, world_size=world) for r in range(world)]
        ids = [x[0].id for st in streams for x in st]
        assert sorted(ids) == sorted(got)
        assert sum(st.skip_counts.get("shard_lost", 0) for st in streams) == lost


def test_ranks_see_disjoint_data_covering_everything(data: dict[str, Any]) -> None:
    for which, world in (("jsonl", 2), ("shards", 2), ("shards", 3), ("shards", 8)):
        parts = [[x[0].id for x in make_stream(data, data[which], epochs=1, rank=r, world_size=world)]
                 for r in range(world)]
        ids = [i for p in parts for i in p]
        assert len(ids) == len(set(ids)) == 30, (which, world)
    with pytest.raises(MMTuneError, match="out of range"):
        make_stream(data, data["jsonl"], rank=2, world_size=2)


def test_workers_do_not_change_the_sequence_or_resumption(data: dict[str, Any]) -> None:
    full = [sig(x) for x in make_stream(data, data["shards"])]
    s = make_stream(data, data["shards"], num_workers=2)
    head = [sig(x) for x in itertools.islice(iter(s), 13)]
    resumed = make_stream(data, data["shards"], num_workers=2)
    resumed.load_state_dict(s.state_dict())
    assert head + [sig(x) for x in resumed] == full
    assert resumed.skip_counts == {"holdout_task": 2, "no_trainable_tokens": 2}


def test_bad_settings_and_sources_fail_clearly(data: dict[str, Any]) -> None:
    s = make_stream(data, data["jsonl"])
    next(iter(s))
    with pytest.raises(MMTuneError, match="seed was 3 when saved, now 4"):
        make_stream(data, data["jsonl"], seed=4).load_state_dict(s.state_dict())
    with pytest.raises(MMTuneError, match="not found"):
        make_stream(data, str(data["tmp"] / "nope.jsonl"))
    with pytest.raises(MMTuneError, match="image_transform"):
        make_stream(data, data["jsonl"], image_transform=None)
    only_held = data["tmp"] / "held.jsonl"
    write_records([r for r in data["recs"] if r.id == "held"], only_held)
    with pytest.raises(MMTuneError, match="no usable example.*holdout_task"):
        list(make_stream(data, str(only_held), epochs=None))
    endless = make_stream(data, data["jsonl"], epochs=None)
    assert len(list(itertools.islice(iter(endless), 95))) == 95 and endless.epoch == 3


def test_from_config_and_pickling(data: dict[str, Any]) -> None:
    import pickle

    from mmtune.config import DataConfig

    cfg = DataConfig(train=[data["jsonl"]], template="vicuna_v1", max_length=256, shuffle_buffer=4,
                     holdout_tasks=["secret", "add"])
    s = ExampleStream.from_config(cfg, data["tok"], num_image_tokens=N_IMG_TOKENS, image_transform=to_tensor,
                                  seed=3, rank=0, world_size=1)
    first = next(iter(s))
    clone = pickle.loads(pickle.dumps(s))  # what a spawn-started worker gets (no open file handles)
    assert clone.state_dict() == s.state_dict()
    rest = [x[0].id for x in s]
    assert [x[0].id for x in clone] == rest
    assert s.skip_counts["holdout_task"] == 13 and first[0].id not in rest  # 12 "add" records + "held"


def test_a_worker_reads_the_bytes_of_its_own_samples_only(tmp_path: Path, data: dict[str, Any]) -> None:
    """Every DataLoader worker walks the whole item sequence (that is how the order stays the same for any
    num_workers), but it reads only the tar headers of the samples other workers own, not their bytes:
    counted as bytes this process read from files (/proc/self/io), against the shards' size."""
    io_file = Path("/proc/self/io")
    if not io_file.is_file():
        pytest.skip("needs /proc/self/io (Linux) to count the bytes a process reads")

    def bytes_read() -> int:
        return int(next(line for line in io_file.read_text().splitlines() if line.startswith("rchar:")).split()[1])

    rng = np.random.default_rng(0)
    recs = []
    for i in range(8):  # noise JPEGs of ~100 KB each: the payload dwarfs headers and JSON
        path = tmp_path / f"noise{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)).save(path, quality=95)
        recs.append(Record(f"n{i}", [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": f"noise {i}"}],
                           [str(path)]))
    write_records(recs, tmp_path / "noise.jsonl")
    write_shards(tmp_path / "noise.jsonl", tmp_path / "noise", max_count=4)
    total = sum(p.stat().st_size for p in (tmp_path / "noise").glob("*.tar"))
    stream = make_stream(data, str(tmp_path / "noise"), epochs=1, num_workers=2)
    got, shares = [], []
    for worker in (0, 1):
        before = bytes_read()
        got.append([o[2][0].id for o in stream._outcomes(worker, 2, (0, 0), stream_mod.WORKER_BLOCK)])
        shares.append(bytes_read() - before)
    assert sorted(got[0] + got[1]) == sorted(r.id for r in recs) and len(got[0]) == len(got[1]) == 4
    for share in shares:  # half the samples each (+ headers and JSON); reading every sample would be >= total
        assert share < 0.65 * total, (shares, total)


def test_worker_images_travel_as_arrays_and_come_back_equal(data: dict[str, Any]) -> None:
    """Images from DataLoader workers come through the worker's pipe as arrays (not one new shared-memory
    segment per image, torch's default for tensors), equal in value, shape, dtype and layout."""
    from multiprocessing.reduction import ForkingPickler

    base = torch.arange(5 * 7 * 3, dtype=torch.uint8).reshape(5, 7, 3)
    cases = [base.permute(2, 0, 1), base.permute(2, 0, 1).contiguous(), torch.rand(3, 4, 6),
             torch.rand(3, 8, 8)[:, ::2, 1:5], torch.rand(3, 2, 2, dtype=torch.bfloat16)]
    for t in cases:
        back = stream_mod._Pixels.unwrap(ForkingPickler.loads(ForkingPickler.dumps(stream_mod._Pixels.wrap(t))))
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
    assert stream_mod._Pixels.unwrap(stream_mod._Pixels.wrap(cases[0])).stride() == cases[0].stride()
    images = [img for _, imgs in make_stream(data, data["shards"], epochs=1, num_workers=1) for img in imgs]
    assert len(images) >= 6 and not any(img.is_shared() for img in images)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (the real JPEGs the loader benchmark reads)")
def test_loader_benchmark_runs_shrunk_and_prints_every_row(capsys):
    """scripts/bench_loader.py at a tiny budget: every limit and pipeline row, with its ratios, is printed."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_loader.py"
    spec = importlib.util.spec_from_file_location("bench_loader", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        assert script.main(["--records", "16", "--batch-size", "8", "--workers", "1", "--rounds", "1", "--reps", "1",
                            "--images", str(SHARED_DATA)]) == 0
    finally:
        torch.set_num_threads(threads)  # the script pins one thread
    out = capsys.readouterr().out
    for row in ("PIL decode+resize, full decode", "PIL decode+expand2square+resize (LLaVA's), full decode",
                "decode + tower transform (pad, resize, uint8), full decode", "0 worker(s), uint8, full",
                "1 worker(s), uint8, draft", "0 worker(s), float on CPU, full"):
        assert row in out, row
    assert "% LLaVA" in out and "JPEG draft:" in out
    assert "resize alone" in out and "tall pad_resize" in out
    assert re.search(r"ceiling: decode \+ the tower transform alone is \d+% of the squash limit", out)
