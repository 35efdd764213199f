"""`mmtune shard` and the shard readers: lossless round trip, rejects, truncation, splitting."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from mmtune.cli import main
from mmtune.data.schema import Record, read_records, write_records
from mmtune.data.shards import (
    LazyShardSample,
    ShardLoss,
    expand_shards,
    iter_records,
    is_shard_source,
    parse_size,
    read_shard,
    shard_key,
    stream_samples,
    write_shards,
)
from mmtune.errors import MMTuneError

FIX = Path(__file__).parent / "fixtures" / "shards"


def _png(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (6, 5), colour).save(path, format="PNG")
    return path


@pytest.fixture
def records_file(tmp_path: Path) -> tuple[Path, list[Record]]:
    """The 6 real LLaMA-Factory image chats (JPEG) + PNG, text-only and awkward-id records."""
    recs = read_records(FIX / "mllm_records.jsonl")
    for r in recs:
        r.images = [str(FIX / p) for p in r.images]
    png = _png(tmp_path / "Red Square.PNG", (200, 10, 10))
    recs.append(Record("a/b.c d", [{"role": "user", "content": "<image>colour?"}, {"role": "assistant", "content": "red"}], [str(png)], task="colour"))
    recs.append(Record("a_b_c_d", [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], meta={"k": [1, 2]}))
    recs.extend(Record(f"text-{i}", [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}]) for i in range(5))
    path = tmp_path / "records.jsonl"
    write_records(recs, path)
    return path, recs


def test_round_trip_is_lossless_and_plain_webdataset_reads_it(tmp_path: Path, records_file: tuple[Path, list[Record]]) -> None:
    path, recs = records_file
    out = tmp_path / "shards"
    summary = write_shards(path, out, max_count=4)
    assert summary.records == len(recs) == 13 and summary.rejects == 0
    assert [n for n, _, _ in summary.shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    index = json.loads((out / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [4, 4, 4, 1]

    # records -> shards -> records: identical records, image bytes identical, extensions kept
    back = list(iter_records(str(out / "shard-{000000..000003}.tar")))
    assert [r.to_dict() for r in back] == [r.to_dict() for r in recs]
    extracted = list(iter_records(out, extract_images_to=tmp_path / "x"))
    for orig, got in zip(recs, extracted, strict=True):
        assert len(got.images) == len(orig.images)
        for a, b in zip(orig.images, got.images, strict=True):
            assert Path(b).read_bytes() == Path(a).read_bytes()
            assert Path(b).suffix == Path(a).suffix.lower()
        assert {**got.to_dict(), "images": orig.images} == orig.to_dict()

    # plain webdataset, no mmtune: one sample per record, `.json` + `.N.ext` members
    samples = list(wds.WebDataset(str(out / "shard-{000000..000003}.tar"), shardshuffle=False))
    assert len(samples) == len(recs)
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys) and keys[0] == "mllm_demo-0"
    by_id = {json.loads(s["json"])["id"]: s for s in samples}
    assert sorted(k for k in by_id["mllm_demo-0"] if not k.startswith("_")) == ["0.jpg", "1.jpg", "json"]
    assert by_id["a/b.c d"]["0.png"] == (tmp_path / "Red Square.PNG").read_bytes()
    assert by_id["mllm_demo-1"]["0.jpg"] == (FIX / "images" / "2.jpg").read_bytes()

    # same records -> byte-identical shards (fixed mtime), and no overwrite without asking
    with pytest.raises(MMTuneError, match="--overwrite"):
        write_shards(path, out, max_count=4)
    first = (out / "shard-000000.tar").read_bytes()
    write_shards(path, out, max_count=4, overwrite=True)
    assert (out / "shard-000000.tar").read_bytes() == first


def test_shard_keys_are_safe_and_unique() -> None:
    taken: set[str] = set()
    keys = [shard_key(i, taken) for i in ["a/b.c d", "a_b_c_d", "a_b_c_d", "__meta__", "x" * 300, "ok-1"]]
    assert len(set(keys)) == 6
    assert keys[1] == "a_b_c_d" and keys[5] == "ok-1"
    for k in keys:
        assert "." not in k and "/" not in k and not k.startswith("_") and len(k) <= 80


def test_max_size_and_parse_size(tmp_path: Path, records_file: tuple[Path, list[Record]]) -> None:
    assert parse_size("200MB") == 200_000_000 and parse_size("1.5G") == 1_500_000_000 and parse_size("512") == 512
    with pytest.raises(MMTuneError, match="max-size"):
        parse_size("lots")
    summary = write_shards(records_file[0], tmp_path / "s", max_size=30_000)
    # a shard closes once it passes 30 kB: the 12-23 kB JPEG records end up 1-2 per shard
    assert len(summary.shards) >= 4 and sum(c for _, c, _ in summary.shards) == 13


def test_bad_records_go_to_rejects_and_cli_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    ok = _png(tmp_path / "ok.png", (1, 2, 3))
    lines = [
        {"id": "good", "messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}], "images": ["ok.png"]},
        {"id": "missing", "messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}], "images": ["nope.jpg"]},
        {"id": "url", "messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}], "images": ["http://x/y.jpg"]},
        {"id": "broken", "messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}], "images": [str(broken)]},
        {"id": "good", "messages": [{"role": "user", "content": "again"}, {"role": "assistant", "content": "yo"}]},
        {"id": "noimg", "messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}]},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    out = tmp_path / "out"
    rc = main(["shard", str(src), "--out", str(out), "--image-root", str(tmp_path)])
    printed = capsys.readouterr().out
    assert rc == 0 and "1 record(s)" in printed and "6 rejected" in printed
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = "\n".join(r["reason"] for r in rejects)
    assert len(rejects) == 6
    for needle in ["'missing', field 'images[0]': image not found", "'url'", "URL", "'broken'", "cannot be decoded",
                   "duplicate id", "'noimg'", ":7: bad JSON"]:
        assert needle in reasons, needle
    assert ok.exists() and [r.id for r in iter_records(out)] == ["good"]

    rc = main(["shard", str(src), "--out", str(out), "--image-root", str(tmp_path), "--overwrite", "--strict"])
    assert rc == 1
    src.write_text(json.dumps(lines[1]) + "\n")
    rc = main(["shard", str(src), "--out", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert rc == 2 and "no record could be written" in err and "image not found" in err
    assert not list((tmp_path / "none").glob("*.tar"))


def _members(path: Path) -> dict[str, list[tarfile.TarInfo]]:
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    out: dict[str, list[tarfile.TarInfo]] = {}
    for m in members:
        out.setdefault(m.name.split(".")[0], []).append(m)
    return out


def _truncate_inside(path: Path, sample: int, member: int) -> None:
    """Cut a shard half-way through one member of one sample (as an interrupted copy would)."""
    m = list(_members(path).values())[sample][member]
    path.write_bytes(path.read_bytes()[: m.offset_data + m.size // 2])


def _garble_header(path: Path, sample: int) -> None:
    """Overwrite the tar header of a sample's first member with junk."""
    m = list(_members(path).values())[sample][0]
    data = bytearray(path.read_bytes())
    data[m.offset: m.offset + 512] = b"\x00garbage" * 64
    path.write_bytes(bytes(data))


def test_truncated_and_corrupt_shards_are_skipped_counted_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                     records_file: tuple[Path, list[Record]]) -> None:
    path, recs = records_file
    out = tmp_path / "shards"
    write_shards(path, out, max_count=4)
    # shard 1 = mllm_demo-4, mllm_demo-5, "a/b.c d" (0.png, json), a_b_c_d: cut inside the 3rd sample's json
    _truncate_inside(out / "shard-000001.tar", 2, 1)
    _garble_header(out / "shard-000000.tar", 2)  # a corrupt header in the middle of the first shard

    losses: list[ShardLoss] = []
    with caplog.at_level(logging.WARNING, logger="mmtune.data.shards"):
        back = list(iter_records(out, losses=losses))
    lost_total = sum(x.lost or 0 for x in losses)
    assert len(back) + lost_total == len(recs)
    assert {Path(x.url).name for x in losses} == {"shard-000000.tar", "shard-000001.tar"}
    assert "shard-000001.tar" in caplog.text and "lost" in caplog.text
    good = {r.id: r.to_dict() for r in recs}
    for r in back:  # whatever came back is intact
        assert r.to_dict() == good[r.id]
    assert [r.id for r in back if r.id in {x.id for x in recs[8:]}] == [x.id for x in recs[8:]]  # shards 2, 3 whole

    items = list(read_shard(str(out / "shard-000001.tar")))
    loss = items[-1]
    assert isinstance(loss, ShardLoss) and loss.expected == 4 and loss.read == 3 and loss.lost == 1
    partial = items[2]
    assert partial.error is not None and "json" in partial.error  # flagged, not passed on as complete
    assert "shard-000001.tar" in caplog.text and "sample 'a_b_c_d-" in caplog.text
    # the ranked reader counts the same way and yields only complete samples
    got = list(stream_samples(out, shuffle=False, rank=0, world_size=1, on_loss=losses.append))
    assert len(got) == len(back)


def test_sources_patterns_pipes_and_node_split(tmp_path: Path, records_file: tuple[Path, list[Record]]) -> None:
    path, recs = records_file
    out = tmp_path / "shards"
    write_shards(path, out, max_count=4)
    assert is_shard_source(str(out)) and is_shard_source("x/shard-{000000..000009}.tar")
    assert is_shard_source("pipe:curl -s http://h/a.tar") and not is_shard_source(str(path))
    assert len(expand_shards(str(out / "shard-{000000..000003}.tar"))) == 4
    assert expand_shards(str(out / "shard-*.tar")) == expand_shards(str(out))
    with pytest.raises(MMTuneError, match="shard-000004.tar: shard not found"):
        expand_shards(str(out / "shard-{000003..000004}.tar"))
    piped = list(iter_records(f"pipe:cat {out / 'shard-000000.tar'}"))
    assert [r.id for r in piped] == [r.id for r in recs[:4]]

    all_ids = {r.id for r in recs}
    for world in (2, 3, 5):  # 4 shards: split by shard for 2 and 3 readers, by sample for 5
        parts = [[s.record().id for s in stream_samples(out, seed=7, epoch=1, shuffle_buffer=3, rank=r, world_size=world)]
                 for r in range(world)]
        assert sum(len(p) for p in parts) == len(recs)
        assert set().union(*map(set, parts)) == all_ids
    a = [s.key for s in stream_samples(out, seed=7, epoch=0, shuffle_buffer=5, rank=0, world_size=1)]
    b = [s.key for s in stream_samples(out, seed=7, epoch=0, shuffle_buffer=5, rank=0, world_size=1)]
    c = [s.key for s in stream_samples(out, seed=7, epoch=1, shuffle_buffer=5, rank=0, world_size=1)]
    assert a == b and sorted(a) == sorted(c) and a != c


def test_folder_without_index_and_copied_shards(tmp_path: Path, records_file: tuple[Path, list[Record]]) -> None:
    out = tmp_path / "shards"
    write_shards(records_file[0], out, max_count=20)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(out / "shard-000000.tar", bare / "shard-000000.tar")
    # a folder of .tar files without index.json (img2dataset's layout) stands for its tars, in name order
    assert expand_shards(str(bare)) == [str(bare / "shard-000000.tar")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MMTuneError, match="index.json"):
        expand_shards(str(empty))
    # without an index a truncated shard still reports, with an unknown count
    data = (bare / "shard-000000.tar").read_bytes()
    (bare / "shard-000000.tar").write_bytes(data[:3000])
    items = list(read_shard(str(bare / "shard-000000.tar")))
    assert isinstance(items[-1], ShardLoss) and items[-1].expected is None
    assert "count unknown" in items[-1].describe()


def _outcome(item: object) -> tuple[object, ...]:
    """What a reader yields, comparable across the eager and the lazy reader (errors by presence)."""
    if isinstance(item, ShardLoss):
        return ("loss", item.read, item.expected, bool(item.errors))
    assert not isinstance(item, LazyShardSample)
    return ("sample", item.key, item.index, item.json_bytes, tuple(item.images), item.error, item.reject)


def test_lazy_reader_gives_the_eager_readers_samples_and_losses(tmp_path: Path, records_file: tuple[Path, list[Record]]) -> None:
    """Headers-only reading (what the training stream uses) yields exactly what webdataset's stream reader
    yields, on an intact shard, on the shard cut at every 512-byte block and inside every member, and with
    each header garbled; and it reads no member's bytes until a sample is loaded."""
    out = tmp_path / "shards"
    write_shards(records_file[0], out, max_count=6)
    url = out / "shard-000000.tar"
    data = url.read_bytes()
    with tarfile.open(url) as tf:
        members = tf.getmembers()
    cuts = sorted({*range(0, len(data), 512), *(m.offset_data + m.size // 2 for m in members),
                   *(m.offset_data + m.size for m in members), len(data) - 1})
    variants = [data] + [data[:c] for c in cuts]
    for m in members:
        garbled = bytearray(data)
        garbled[m.offset: m.offset + 512] = b"\x00garbage" * 64
        variants.append(bytes(garbled))
    case = tmp_path / "case" / "shard-000000.tar"
    case.parent.mkdir()
    shutil.copy(out / "index.json", case.parent / "index.json")  # same expected counts
    for k, blob in enumerate(variants):
        case.write_bytes(blob)
        eager = [_outcome(x) for x in read_shard(str(case))]
        lazy_items = list(read_shard(str(case), lazy=True))
        lazy = [_outcome(x.load() if isinstance(x, LazyShardSample) else x) for x in lazy_items]
        assert lazy == eager, f"variant {k}"
        assert all(not isinstance(x, LazyShardSample) or not any(isinstance(v, bytes) for v in x.members.values())
                   for x in lazy_items)
    # headers tarfile must parse (pax for a long name, GNU format) in the middle of a shard: tarfile takes over
    import io

    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        other = tmp_path / "case" / f"other-{fmt}.tar"
        with tarfile.open(other, "w", format=fmt) as tf:
            for name, blob in [("k1.json", b"{}"), ("k1.0.png", b"x" * 700), ("l" * 120 + ".json", b"{1}"),
                               ("k3.json", b"[]"), ("__meta__", b"m"), ("k4.json", b"")]:
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
        eager = [_outcome(x) for x in read_shard(str(other))]
        lazy = [_outcome(x.load() if isinstance(x, LazyShardSample) else x) for x in read_shard(str(other), lazy=True)]
        assert lazy == eager and len(eager) == 4, fmt
    # remote and compressed sources are read eagerly, whatever is asked (a gzipped tar named .tar too)
    piped = list(read_shard(f"pipe:cat {url}", lazy=True))
    assert piped and not any(isinstance(x, LazyShardSample) for x in piped)
    import gzip

    case.write_bytes(gzip.compress(data))
    gz = list(read_shard(str(case), lazy=True))
    assert [_outcome(x) for x in gz] == [_outcome(x) for x in read_shard(str(url))] and len(gz) == 6
