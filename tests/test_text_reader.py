"""One reader for every JSON/JSONL input (issue 16, "Tracebacks instead of one-line errors").

A UTF-8 BOM, a line that is not UTF-8, and a JSON string with an unpaired
surrogate escape (`"\\ud83d"`, common in scraped chat dumps) used to crash
convert, shard and train on write (leaving OUT.tmp behind), crash shard and
select on read, or make convert refuse the whole file. Now every reader goes
through `mmtune.data.textio`: the BOM is skipped, and each bad line is one
counted reject naming its line, while the rest of the file goes on.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmtune.cli import main
from mmtune.data.schema import Record, read_records_with_errors, write_records
from mmtune.data.textio import parse_json


def rec(rid: str, answer: str = "yes") -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": f"question {rid}?"},
                                    {"role": "assistant", "content": answer}], "images": []}


def dirty_file(path: Path) -> Path:
    """Line 1 (with a BOM) and 4 good; line 2 an unpaired surrogate escape; line 3 not UTF-8."""
    lines = [
        b"\xef\xbb\xbf" + json.dumps(rec("a")).encode(),
        json.dumps(rec("b", "broken emoji \ud83d")).encode(),  # json.dumps writes the escape "\ud83d"
        json.dumps(rec("c", "caf\u00e9"), ensure_ascii=False).encode("utf-8").replace(b"\xc3\xa9", b"\xe9"),  # Latin-1 byte
        json.dumps(rec("d")).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def no_temp_files(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*") if ".tmp" in p.name]
    assert not left, left


def test_the_reader_names_each_kind_of_bad_line():
    assert parse_json('{"a": "\\ud83d!"}') == (None, "unpaired surrogate \\ud83d in a")
    assert parse_json('{"a": "\\ud83d\\ude00"}') == ({"a": "\U0001f600"}, None)  # a proper pair is fine
    value, reason = parse_json('{"a": [1, 2}')
    assert value is None and reason.startswith("bad JSON (")


def test_convert_counts_bad_lines_and_writes_the_rest(tmp_path, capsys):
    src = dirty_file(tmp_path / "chat.jsonl")
    out = tmp_path / "out" / "pool.jsonl"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    assert "converted 2, rejected 2" in capsys.readouterr().out
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "d"]
    rejects = [json.loads(line) for line in (tmp_path / "out" / "pool.rejects.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rejects] == [2, 3]
    assert "unpaired surrogate \\ud83d in messages[1].content" in rejects[0]["reason"]
    assert rejects[1]["reason"].startswith(f"{src}:3: not UTF-8 text (byte 0xe9")
    no_temp_files(tmp_path)


def test_convert_json_array_with_a_bad_element(tmp_path, capsys):
    rows = [{"instruction": "hi", "input": "", "output": "ok"}, {"instruction": "x", "input": "", "output": "\ud83d"}]
    src = tmp_path / "alpaca.json"
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert main(["convert", str(src), "--out", str(tmp_path / "o.jsonl")]) == 0
    assert "converted 1, rejected 1" in capsys.readouterr().out
    reject = json.loads((tmp_path / "o.rejects.jsonl").read_text())
    assert reject["index"] == 1 and "unpaired surrogate" in reject["reason"]


def test_shard_counts_bad_lines_and_accepts_a_bom(tmp_path, capsys):
    src = dirty_file(tmp_path / "chat.jsonl")
    assert main(["shard", str(src), "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "2 records" in out and "2 rejected" in out, out
    rejects = [json.loads(line) for line in (tmp_path / "s" / "rejects.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rejects] == [2, 3]
    no_temp_files(tmp_path)


def test_select_accepts_a_bom_and_names_a_bad_line_in_one_line(tmp_path, capsys):
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(rec(x, x * 3)).encode() + b"\n" for x in "abc"))
    assert main(["select", str(pool), "--k", "2", "--method", "longest", "--out", str(tmp_path / "sub.jsonl")]) == 0
    assert len((tmp_path / "sub.jsonl").read_text().splitlines()) == 2
    dirty = dirty_file(tmp_path / "dirty.jsonl")
    capsys.readouterr()
    assert main(["select", str(dirty), "--k", "1", "--method", "longest", "--out", str(tmp_path / "s2.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 bad line(s)" in err[0] and f"{dirty}:2" in err[0], err


def test_train_reader_counts_bad_lines_as_invalid_records(tmp_path):
    from mmtune.data.stream import ExampleStream
    from mmtune.data.tokenizer import build_byte_bpe_tokenizer, record_texts

    src = dirty_file(tmp_path / "chat.jsonl")
    tok = build_byte_bpe_tokenizer(list(record_texts([Record(**rec(x)) for x in "abcd"])) * 20, 400)
    stream = ExampleStream([str(src)], tok, "vicuna_v1", max_length=256, shuffle=False, epochs=1, rank=0,
                           world_size=1)
    assert sorted(ex.id for ex, _ in stream) == ["a", "d"]  # line 1 carries the BOM
    assert stream.skip_counts == {"invalid_record": 2}
    records, errors = read_records_with_errors(src)
    assert [r.id for r in records] == ["a", "d"] and [e.line for e in errors] == [2, 3]


def test_writers_never_crash_on_a_lone_surrogate_nor_leave_a_temp_file(tmp_path):
    out = tmp_path / "o.jsonl"
    bad = Record("s", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "half \ud83d"}])
    assert write_records([Record(**rec("ok")), bad], out) == 2
    no_temp_files(tmp_path)
    records, errors = read_records_with_errors(out)  # read back: the escape is there, and is a counted reject
    assert [r.id for r in records] == ["ok"] and "unpaired surrogate" in errors[0].reason
