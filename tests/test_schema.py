"""The unified record schema: validation messages name file, line, record id and field."""

from __future__ import annotations

import json

import pytest

from mmtune.data.schema import (
    Record,
    RecordError,
    RejectsWriter,
    read_records,
    read_records_with_errors,
    validate_record,
    write_records,
)

TEXT = {
    "id": "alpaca-5",
    "messages": [
        {"role": "user", "content": "Given the parameters of a triangle, find out its perimeter.\n\nSide 1 = 4"},
        {"role": "assistant", "content": "18"},
    ],
    "images": [],
    "meta": {"instruction": "Given the parameters of a triangle, find out its perimeter.", "input": "Side 1 = 4"},
}
IMAGE = {
    "id": "458752000",
    "messages": [
        {"role": "user", "content": "<image>\nWhat is this photo taken looking through?"},
        {"role": "assistant", "content": "net"},
    ],
    "images": ["/data/COCO_train2014_000000458752.jpg"],
    "task": "vqav2",
    "answers": ["net", "net", "netting"],
}


def test_valid_records_round_trip():
    for obj in (TEXT, IMAGE):
        rec = validate_record(obj)
        assert Record.from_dict(json.loads(rec.to_json())) == rec
    rec = validate_record(IMAGE)
    assert rec.is_multimodal and rec.instruction() == "What is this photo taken looking through?"
    assert not validate_record(TEXT).is_multimodal


def test_int_id_and_single_image_string_are_normalized():
    rec = validate_record({**IMAGE, "id": 458752000, "images": "/data/a.jpg"})
    assert rec.id == "458752000" and rec.images == ["/data/a.jpg"]


def _with(**changes):
    obj = json.loads(json.dumps(IMAGE))
    for key, value in changes.items():
        if value is ...:
            obj.pop(key)
        else:
            obj[key] = value
    return obj


@pytest.mark.parametrize(
    "obj, field, reason",
    [
        (_with(messages=...), "messages", "missing required field"),
        (_with(messages=[]), "messages", "non-empty list"),
        (_with(messages=["hi"]), "messages[0]", "must be an object"),
        (_with(messages=[{"role": "human", "content": "x"}]), "messages[0].role", "role must be one of"),
        (_with(messages=[{"role": "user", "content": 3}]), "messages[0].content", "content must be a string"),
        (_with(messages=[{"role": "assistant", "content": "x"}], images=[]), "messages", "at least one user turn"),
        (_with(messages=[{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": " "}]),
         "messages[1].content", "empty assistant turn"),
        (_with(images=[]), "images", "1 <image> placeholder(s) but 0 image(s)"),
        (_with(images=["a.jpg", "b.jpg"]), "images", "1 <image> placeholder(s) but 2 image(s)"),
        (_with(images=[3]), "images", "non-empty path/URL strings"),
        (_with(task=5), "task", "must be a string"),
        (_with(answers="net"), "answers", "list of strings"),
        (_with(meta=[1]), "meta", "must be an object"),
        (_with(question="x"), "question", "unknown field(s) ['question']"),
    ],
)
def test_errors_name_path_line_record_and_field(obj, field, reason):
    with pytest.raises(RecordError) as info:
        validate_record(obj, line=7, path="pool.jsonl")
    err = info.value
    text = str(err)
    assert text.startswith("pool.jsonl:7, record '458752000', ")
    assert f"field '{field}'" in text and reason in text
    assert (err.record_id, err.field, err.line, err.path) == ("458752000", field, 7, "pool.jsonl")
    assert "\n" not in text


@pytest.mark.parametrize(
    "obj, field, reason",
    [({"messages": TEXT["messages"]}, "id", "missing required field"), ({**TEXT, "id": ["x"]}, "id", "non-empty string"),
     ([1, 2], None, "expected a JSON object")],
)
def test_errors_without_an_id(obj, field, reason):
    with pytest.raises(RecordError) as info:
        validate_record(obj, line=3, path="pool.jsonl")
    text = str(info.value)
    assert text.startswith("pool.jsonl:3") and reason in text
    if field:
        assert f"field '{field}'" in text


def test_located_fills_only_missing_parts():
    err = RecordError("empty assistant turn", record_id="a", field="messages[1].content")
    assert str(err) == "record 'a', field 'messages[1].content': empty assistant turn"
    assert str(err.located("x.jsonl", 4)) == "x.jsonl:4, record 'a', field 'messages[1].content': empty assistant turn"
    assert err.located("x.jsonl", 4).located("y.jsonl", 9).line == 4


def test_read_records_reports_bad_lines_and_duplicates(tmp_path):
    path = tmp_path / "pool.jsonl"
    lines = [json.dumps(TEXT), "", "{not json", json.dumps(IMAGE), json.dumps(TEXT), json.dumps({**TEXT, "id": 7, "x": 1})]
    path.write_text("\n".join(lines) + "\n")
    records, errors = read_records_with_errors(path)
    assert [r.id for r in records] == ["alpaca-5", "458752000"]
    assert [e.line for e in errors] == [3, 5, 6]
    assert "bad JSON" in str(errors[0]) and str(errors[0]).startswith(f"{path}:3")
    assert "duplicate id (first on line 1)" in str(errors[1]) and "record 'alpaca-5'" in str(errors[1])
    assert "record '7'" in str(errors[2]) and "field 'x'" in str(errors[2])
    with pytest.raises(RecordError, match=r"pool.jsonl:3: bad JSON"):
        read_records(path)
    assert len(read_records(path, strict=False)) == 2


def test_write_records_is_atomic_and_round_trips(tmp_path):
    recs = [validate_record(TEXT), validate_record(IMAGE)]
    out = tmp_path / "sub" / "out.jsonl"
    assert write_records(recs, out) == 2
    assert read_records(out) == recs
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_rejects_writer_writes_located_entries_lazily(tmp_path):
    path = tmp_path / "r.jsonl"
    with RejectsWriter(path) as rw:
        assert not path.exists()  # nothing rejected, nothing written
        rw.add("bad row", source="in.jsonl", index=4, raw={"a": 1})
        rw.add_error(RecordError("missing", field="id", path="in.jsonl", line=9), raw=[1])
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert entries == [
        {"source": "in.jsonl", "index": 4, "reason": "bad row", "raw": {"a": 1}},
        {"source": "in.jsonl", "index": 9, "reason": "in.jsonl:9, field 'id': missing", "raw": [1]},
    ]
    assert rw.count == 2 and rw.first_reason == "bad row"
    counting = RejectsWriter(None)
    counting.add("x")
    assert counting.count == 1
