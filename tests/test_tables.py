"""Parquet / Arrow / `datasets.save_to_disk` inputs for `mmtune convert` and `mmtune shard`.

The tables are written here in the layouts public LLaVA-style sets use:
LLaVA-OneVision-Data (`id`, one `image`, ShareGPT `conversations`), LLaMA-Factory's
llava-en-zh (`messages`, a list of `images`), TRL's llava-instruct-mix (`messages`
whose content is a list of parts) and Alpaca as an Arrow `save_to_disk` folder.
Embedded image bytes must come out byte for byte (a decode + re-encode fails).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmtune.cli import main
from mmtune.data.convert import convert_files
from mmtune.data.schema import read_records
from mmtune.data.shards import iter_records


def jpeg(colour: str, size: int = 16) -> bytes:
    buf = io.BytesIO()
    # quality 61 and a comment: a re-encode with PIL's defaults would not give these bytes back
    Image.new("RGB", (size, size), colour).save(buf, "JPEG", quality=61, comment=b"mmtune test " + colour.encode())
    return buf.getvalue()


def png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buf, "PNG")
    return buf.getvalue()


RED, BLUE, GREEN = jpeg("red"), jpeg("blue"), png("green")


def onevision_parquet(path):
    """LLaVA-OneVision-Data layout, written by `datasets` (Image feature, HF metadata)."""
    turns = datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")})
    feats = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                               "conversations": turns, "data_source": datasets.Value("string")})
    conv = [{"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": "red"}]
    rows = {
        "id": ["ov-0", "ov-1", "ov-2", "ov-3"],
        "image": [{"bytes": RED, "path": "coco/red.jpg"}, {"bytes": RED, "path": "coco/red.jpg"},
                  {"bytes": b"not an image", "path": "broken.jpg"}, {"bytes": BLUE, "path": None}],
        "conversations": [conv, conv, conv, [{"from": "human", "value": "<image>\nAnd this?"}]],  # ov-3: no answer
        "data_source": ["coco"] * 4,
    }
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(path))


def llamafactory_parquet(path):
    """LLaMA-Factory llava-en-zh layout, written with plain pyarrow (no `datasets` metadata)."""
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "messages": [
            [{"role": "user", "content": "<image><image>Compare them."}, {"role": "assistant", "content": "Both are squares."}],
            [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
        ],
        "images": pa.array([[{"bytes": GREEN, "path": None}, {"bytes": BLUE, "path": "b.jpg"}], []],
                           type=pa.list_(img)),
    })
    pq.write_table(table, path)


def trl_parquet(path):
    """TRL llava-instruct-mix layout: content as a list of {type, text} parts."""
    feats = datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"),
                                   "content": datasets.List({"type": datasets.Value("string"),
                                                             "text": datasets.Value("string")})}),
        "images": datasets.List(datasets.Image()),
    })
    rows = {"messages": [[
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A blue square.", }]},
    ]], "images": [[{"bytes": BLUE, "path": "blue.jpg"}]]}
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(path))


def test_parquet_layouts_convert_with_identical_image_bytes(tmp_path):
    onevision_parquet(tmp_path / "ov.parquet")
    llamafactory_parquet(tmp_path / "lf.parquet")
    trl_parquet(tmp_path / "trl.parquet")
    out = tmp_path / "out" / "mix.jsonl"
    rc = main(["convert", str(tmp_path / "ov.parquet"), str(tmp_path / "lf.parquet"), str(tmp_path / "trl.parquet"),
               "--out", str(out), "--no-progress"])
    assert rc == 0
    recs = {r.id: r for r in read_records(out)}
    assert set(recs) == {"ov-0", "ov-1", "lf-0", "lf-1", "trl-0"}
    # bytes written as they were embedded: no decode / re-encode
    assert Path(recs["ov-0"].images[0]).read_bytes() == RED
    assert recs["ov-0"].images == recs["ov-1"].images  # the same image shared by rows is written once
    assert [Path(p).read_bytes() for p in recs["lf-0"].images] == [GREEN, BLUE]
    assert recs["lf-0"].images[0].endswith(".png") and recs["lf-0"].images[1].endswith(".jpg")
    assert recs["lf-1"].images == []
    assert recs["trl-0"].messages[0]["content"] == "<image>\nDescribe it."
    assert Path(recs["trl-0"].images[0]).read_bytes() == BLUE
    assert recs["ov-0"].meta["data_source"] == "coco"
    assert all(p.startswith(str(tmp_path / "out" / "mix_images")) for r in recs.values() for p in r.images)
    # bad rows: rejected with their row number, the image bytes summarised, not dumped
    rejects = [json.loads(line) for line in (tmp_path / "out" / "mix.rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["source"].endswith("ov.parquet")) for r in rejects] == [(2, True), (3, True)]
    assert "row 2" in rejects[0]["reason"] and "cannot be decoded" in rejects[0]["reason"]
    assert "row 3" in rejects[1]["reason"] and "no assistant turn" in rejects[1]["reason"]
    assert rejects[0]["raw"]["image"]["bytes"] == f"<{len(b'not an image')} bytes>"
    # and nothing was written for the rejected rows' images
    written = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "out" / "mix_images").iterdir()}
    assert written == {hashlib.sha256(b).hexdigest() for b in (RED, GREEN, BLUE)}


def test_save_to_disk_folders_and_arrow_files(tmp_path):
    alpaca = {"instruction": ["Add 2 and 3.", "Name a colour."], "input": ["", ""], "output": ["5", "red"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(alpaca),
                          "test": datasets.Dataset.from_dict({k: v[:1] for k, v in alpaca.items()})}
                         ).save_to_disk(str(tmp_path / "alpaca_dd"))
    datasets.Dataset.from_dict(alpaca).save_to_disk(str(tmp_path / "alpaca_ds"))
    arrow = next((tmp_path / "alpaca_ds").glob("*.arrow"))
    res = convert_files([tmp_path / "alpaca_dd", tmp_path / "alpaca_ds", arrow], progress=False)
    assert not res.rejects
    assert len(res.records) == 3 + 2 + 2
    assert res.records[0].messages[-1]["content"] == "5"
    assert set(res.formats.values()) == {"alpaca"}


def test_shard_straight_from_parquet_keeps_bytes(tmp_path):
    onevision_parquet(tmp_path / "ov.parquet")
    llamafactory_parquet(tmp_path / "lf.parquet")
    out = tmp_path / "shards"
    rc = main(["shard", str(tmp_path / "ov.parquet"), str(tmp_path / "lf.parquet"), "--out", str(out),
               "--no-progress"])
    assert rc == 0
    assert not (tmp_path / "ov_images").exists() and not any(tmp_path.glob("*_images"))  # nothing on the side
    got = {r.id: r for r in iter_records(out, extract_images_to=tmp_path / "x")}
    assert set(got) == {"ov-0", "ov-1", "lf-0", "lf-1"}
    assert Path(got["ov-0"].images[0]).read_bytes() == RED
    assert [Path(p).read_bytes() for p in got["lf-0"].images] == [GREEN, BLUE]
    stored = {r.id: r for r in iter_records(out)}
    assert stored["ov-0"].images == ["coco/red.jpg"]  # the embedded path, as a name
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rejects] == [2, 3]


def test_unreadable_table_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    rc = main(["convert", str(bad), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(bad) in err and len(err.splitlines()) == 1
