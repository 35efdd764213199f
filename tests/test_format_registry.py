"""A format registered outside mmtune can read a release split over several files: `mmtune.data.convert`
detects it, hands it all its files at once (`Format.pair`) and rejects what it could not join, naming no
layout itself. Before the registry, convert.py joined only VQA's two files, by name."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mmtune.data import formats
from mmtune.data.convert import convert_files
from mmtune.data.formats import FORMATS, Format, InputFile, Paired, Row, RowError, register


class PromptReplies(Format):
    """Test layout: {"prompts": [{pid, text}]} and {"replies": [{pid, text}]}, joined on pid."""

    container = True

    def claims(self, top: dict[str, Any]) -> bool:
        return isinstance(top.get("prompts"), list) or isinstance(top.get("replies"), list)

    def pair(self, inputs: Sequence[InputFile]) -> Paired:
        replies: dict[int, Row] = {}
        prompt_files = []
        for inp in inputs:
            assert inp.top is not None
            if "replies" in inp.top:
                for i, r in enumerate(inp.top["replies"]):
                    replies[r["pid"]] = Row(str(inp.path), i, f"{inp.path}[replies][{i}]", i, data=r)
            else:
                prompt_files.append(inp)
        rows: dict[str, list[Row]] = {}
        for inp in prompt_files:
            assert inp.top is not None
            rows[str(inp.path)] = []
            for i, p in enumerate(inp.top["prompts"]):
                reply = replies.pop(p["pid"], None)
                rows[str(inp.path)].append(Row(str(inp.path), i, f"{inp.path}[prompts][{i}]", i,
                                               data={"prompt": p, "reply": reply and reply.data}))
        for row in replies.values():
            row.error = "reply matches no prompt"
        return Paired(rows, list(replies.values()))

    def map_row(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["reply"] is None:
            raise RowError("no reply for this prompt", "reply", str(row["prompt"]["pid"]))
        return {"id": f"p{row['prompt']['pid']}", "images": [],
                "messages": [{"role": "user", "content": row["prompt"]["text"]},
                             {"role": "assistant", "content": row["reply"]["text"]}]}


@pytest.fixture
def registered() -> Iterator[None]:
    register("prompt-replies", "test: prompts file + replies file")(PromptReplies)
    try:
        yield
    finally:
        FORMATS.pop("prompt-replies", None)


def _write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_a_registered_format_pairs_its_files_and_rejects_the_unjoined(tmp_path: Path, registered: None) -> None:
    prompts = _write(tmp_path / "prompts.json", {"prompts": [{"pid": 1, "text": "hi"}, {"pid": 2, "text": "yo"}]})
    replies = _write(tmp_path / "replies.json", {"replies": [{"pid": 1, "text": "hello"}, {"pid": 9, "text": "?"}]})
    assert formats.detect_format(formats.read_input(replies)) == "prompt-replies"
    res = convert_files([replies, prompts], progress=False, rejects_path=tmp_path / "rej.jsonl")
    assert [r.id for r in res.records] == ["p1"]
    assert res.records[0].messages[1]["content"] == "hello"
    reasons = [r.reason for r in res.rejects]
    assert len(reasons) == 2
    assert "no reply for this prompt" in reasons[0] and "prompts.json[prompts][1]" in reasons[0]
    assert reasons[1] == f"{replies}[replies][1]: reply matches no prompt"
    assert res.formats == {str(replies): "prompt-replies", str(prompts): "prompt-replies"}
    assert res.rows_per_input == {str(prompts): 2, str(replies): 1}  # the joined file counts its leftovers
    assert res.input_rows == len(res.records) + len(res.rejects)


def test_explicit_format_checks_the_layout(tmp_path: Path, registered: None) -> None:
    rows = _write(tmp_path / "rows.json", [{"instruction": "a", "output": "b"}])
    with pytest.raises(formats.FormatError, match="expects the official PROMPT-REPLIES JSON object"):
        convert_files([rows], fmt="prompt-replies", progress=False)
    pair = _write(tmp_path / "p.json", {"prompts": []})
    with pytest.raises(formats.FormatError, match="expects a JSON array or JSONL of rows"):
        convert_files([pair], fmt="alpaca", progress=False)
