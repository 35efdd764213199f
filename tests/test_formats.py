"""Importers and image helpers, on real rows copied into tests/fixtures/data (see PROVENANCE.md)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from mmtune.data import formats
from mmtune.data.formats import (
    FORMATS,
    FormatError,
    RowError,
    detect_format,
    read_input,
    vqa_image_name,
)
from mmtune.data.images import (
    ImageError,
    background_from_mean,
    check_image,
    expand_to_square,
    is_url,
    load_image,
    resolve_image_path,
)
from mmtune.data.schema import validate_record
from mmtune.data.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, alpaca_user, get_template

FIX = Path(__file__).parent / "fixtures" / "data"
COCO = FIX / "images" / "vqav2" / "COCO_train2014_000000458752.jpg"


# --------------------------------------------------------------------------- #
# images
# --------------------------------------------------------------------------- #


def test_resolve_image_path(tmp_path):
    assert resolve_image_path("a/../b.jpg", tmp_path) == str(tmp_path / "b.jpg")
    assert resolve_image_path(str(COCO), tmp_path) == str(COCO)
    assert resolve_image_path("https://x.org/a.jpg", tmp_path) == "https://x.org/a.jpg"
    assert resolve_image_path("~/a.jpg") == os.path.join(os.path.expanduser("~"), "a.jpg")
    assert resolve_image_path("a.jpg") == os.path.join(os.getcwd(), "a.jpg")
    assert is_url("HTTP://x") and not is_url("/data/http.jpg")


def test_check_image(tmp_path):
    assert check_image(COCO) is None
    assert check_image("https://example.org/cat.jpg") is None  # never fetched
    assert check_image(tmp_path / "nope.jpg") == f"image not found: {tmp_path / 'nope.jpg'}"
    assert "not a file" in check_image(tmp_path)
    reason = check_image(FIX / "broken" / "corrupt.jpg")  # a truncated JPEG: verify() alone passes it
    assert reason.startswith("image cannot be decoded") and "truncated" in reason
    text = tmp_path / "x.jpg"
    text.write_text("not an image")
    assert "cannot identify image file" in check_image(text)


def test_load_image_path_bytes_and_modes(tmp_path):
    img = load_image(COCO)
    assert img.mode == "RGB" and max(img.size) == 128
    assert load_image(COCO.read_bytes()).size == img.size
    for mode in ("L", "P", "RGBA", "CMYK"):
        buf = io.BytesIO()
        Image.new(mode, (5, 3)).save(buf, format="TIFF")
        out = load_image(buf.getvalue())
        assert out.mode == "RGB" and out.size == (5, 3)
    with pytest.raises(ImageError, match="image not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="is a URL"):
        load_image("https://example.org/cat.jpg")
    with pytest.raises(ImageError, match=r"cannot be decoded: <bytes>"):
        load_image(b"definitely not an image")
    with pytest.raises(ImageError, match="truncated"):
        load_image(FIX / "broken" / "corrupt.jpg")


def test_load_image_exif_transpose():
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    Image.new("RGB", (8, 4)).save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (8, 4)
    assert load_image(buf.getvalue(), exif_transpose=True).size == (4, 8)


def test_expand_to_square_matches_llava():
    bg = background_from_mean((0.48145466, 0.4578275, 0.40821073))  # CLIP's image mean
    assert bg == (122, 116, 104)
    wide = Image.new("RGB", (6, 2), (255, 0, 0))
    sq = expand_to_square(wide, bg)
    assert sq.size == (6, 6)
    assert sq.getpixel((0, 0)) == bg and sq.getpixel((0, 2)) == (255, 0, 0) and sq.getpixel((5, 5)) == bg
    tall = expand_to_square(Image.new("RGB", (2, 5), (0, 255, 0)), (1, 2, 3))
    assert tall.size == (5, 5) and tall.getpixel((0, 0)) == (1, 2, 3) and tall.getpixel((1, 0)) == (0, 255, 0)
    square = Image.new("RGB", (4, 4))
    assert expand_to_square(square, bg) is square
    gray = expand_to_square(Image.new("L", (3, 1), 200), (9, 9, 9))
    assert gray.mode == "L" and gray.getpixel((0, 0)) == 9 and gray.getpixel((0, 1)) == 200
    rgba = expand_to_square(Image.new("RGBA", (1, 3), (1, 1, 1, 255)), (7, 8, 9))
    assert rgba.getpixel((0, 0)) == (7, 8, 9, 255)
    pal = expand_to_square(Image.new("P", (1, 2)), (5, 5, 5))
    assert pal.mode == "RGB" and pal.size == (2, 2)
    with pytest.raises(ValueError):
        background_from_mean((0.5, 0.5))


# --------------------------------------------------------------------------- #
# reading files
# --------------------------------------------------------------------------- #


def test_read_input_layouts(tmp_path):
    arr = read_input(FIX / "alpaca_en_demo.head.json")
    assert arr.layout == "array" and len(arr.rows) == 6
    assert arr.rows[3].location == f"{FIX / 'alpaca_en_demo.head.json'}[3]" and arr.rows[3].index == 3

    jl = tmp_path / "x.jsonl"
    # CRLF, a blank line, and U+2028 inside a string (splitlines() would cut it in two).
    jl.write_bytes('{"a": "x\u2028y"}\r\n\r\n{"b": 1}\r\n'.encode())
    inp = read_input(jl)
    assert inp.layout == "jsonl" and [r.index for r in inp.rows] == [1, 3]
    assert inp.rows[0].data == {"a": "x\u2028y"} and [r.position for r in inp.rows] == [0, 1]

    one = tmp_path / "one.json"
    one.write_text('\n\n{"instruction": "a",\n "output": "b"}\n')
    inp = read_input(one)
    assert inp.layout == "jsonl" and len(inp.rows) == 1 and inp.rows[0].index == 3

    assert read_input(FIX / "vqav2" / "questions.json").layout == "object"
    compact = tmp_path / "q.json"  # official VQA files are one long line
    compact.write_text(json.dumps(json.loads((FIX / "vqav2" / "questions.json").read_text())))
    assert read_input(compact).layout == "object"
    assert read_input(FIX / "gqa" / "questions.json").layout == "object"

    empty = tmp_path / "e.jsonl"
    empty.write_text("\n  \n")
    assert read_input(empty).rows == []


def test_read_input_bad_lines_become_rows(tmp_path):
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    rows = read_input(jl).rows
    assert rows[1].error.startswith("bad JSON") and rows[1].location == f"{jl}:2" and rows[1].data == '{"a": '
    assert rows[2].data == {"a": 3}
    jl.write_text('["a", 1]\n{"a": 2}\n')  # JSONL whose first row is a list, not a JSON array
    inp = read_input(jl)
    assert inp.layout == "jsonl" and [r.data for r in inp.rows] == [["a", 1], {"a": 2}]


@pytest.mark.parametrize(
    "content, message",
    [
        ("id,instruction,output\n1,a,b\n", "not valid JSON or JSONL"),
        ('[{"a": 1}, {"a": 2},\n', "not valid JSON (line 2, column 1"),
        ('{\n  "questions": [\n    {"question": "x",}\n  ]\n}\n', "not valid JSON or JSONL (line 3"),
        ("42\n", "top-level JSON value is a number"),
        (b"\xff\xd8\xff\xe0 binary", "not a UTF-8 text file"),
    ],
)
def test_read_input_rejects_non_json_files_in_one_line(tmp_path, content, message):
    path = tmp_path / "in.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(FormatError) as info:
        read_input(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("alpaca_en_demo.head.json", "alpaca"),
        ("dolly.head.jsonl", "dolly"),
        ("sharegpt_dummy.json", "sharegpt"),
        ("llava_mix.json", "llava"),
        ("mllm_demo.json", "messages"),
        ("unified.jsonl", "unified"),
        ("vqav2/questions.json", "vqa"),
        ("vqav2/annotations.json", "vqa"),
        ("gqa/questions.json", "gqa"),
        ("broken/mixed_llava.jsonl", "llava"),
        ("broken/alpaca_array.json", "alpaca"),
    ],
)
def test_detect_format(name, fmt):
    assert detect_format(read_input(FIX / name)) == fmt


def test_classify_row():
    assert formats.classify_row({"instruction": "", "input": "", "output": "", "category": "qa"}) == "alpaca"
    assert formats.classify_row({"instruction": "", "context": "", "response": ""}) == "dolly"
    assert formats.classify_row({"id": 1, "messages": [], "images": [], "meta": {}}) == "unified"
    assert formats.classify_row({"id": 1, "messages": [], "images": [], "system": "s"}) == "messages"
    assert formats.classify_row({"conversations": [], "image": "a.jpg"}) == "llava"
    assert formats.classify_row({"conversations": []}) == "sharegpt"
    assert formats.classify_row({"prompt": ""}) is None


def test_detect_format_unknown_keys(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(FormatError, match=r"cannot detect the format from keys \['completion', 'prompt'\]; pass --format"):
        detect_format(read_input(path))
    path.write_text("[1, 2]")
    with pytest.raises(FormatError, match="no JSON objects"):
        detect_format(read_input(path))


# --------------------------------------------------------------------------- #
# row mappers, on real rows
# --------------------------------------------------------------------------- #


def _rows(name):
    return [r.data for r in read_input(FIX / name).rows]


def test_alpaca_rows_render_exactly_like_alpaca():
    rows = _rows("alpaca_en_demo.head.json")
    assert any(r["input"] for r in rows) and any(not r["input"] for r in rows)
    tmpl = get_template("alpaca")
    for row in rows:
        rec = validate_record({**FORMATS["alpaca"].map_row(row), "id": "x"})
        user, assistant = rec.messages
        assert user == {"role": "user", "content": alpaca_user(rec.meta["instruction"], rec.meta["input"])}
        assert user["content"] == (f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"])
        assert assistant == {"role": "assistant", "content": row["output"]}
        assert rec.meta == {"instruction": row["instruction"], "input": row["input"], "output": row["output"]}
        prompt = (ALPACA_PROMPT_INPUT if row["input"] else ALPACA_PROMPT_NO_INPUT).format(**row)
        assert tmpl.render_text(rec.messages, meta=rec.meta, eos_token="</s>") == prompt + row["output"] + "</s>"


def test_alpaca_system_history_images_and_extras():
    row = {
        "instruction": "<image>What is in the picture?", "input": "", "output": "A net.", "system": "Be brief.",
        "history": [["Hello", "Hi!"]], "images": ["a.jpg"], "category": "vqa",
    }
    out = FORMATS["alpaca"].map_row(row)
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert out["messages"][1]["content"] == "Hello" and out["images"] == ["a.jpg"]
    assert out["meta"]["category"] == "vqa" and "history" not in out["meta"]
    for bad, fld in [({"history": [["only one"]]}, "history[0]"), ({"history": "x"}, "history"),
                     ({"system": 3}, "system"), ({"input": None, "output": 1}, "output"),
                     ({"image": "a.jpg"}, "image")]:
        with pytest.raises(RowError) as info:
            FORMATS["alpaca"].map_row({**row, **bad})
        assert info.value.field == fld


def test_dolly_rows():
    rows = _rows("dolly.head.jsonl")
    for row in rows:
        out = FORMATS["dolly"].map_row(row)
        rec = validate_record({**out, "id": "x"})
        assert rec.task == row["category"]
        assert rec.meta == {"instruction": row["instruction"], "input": row["context"],
                            "output": row["response"], "category": row["category"]}
        assert rec.messages[0]["content"] == alpaca_user(rec.meta["instruction"], rec.meta["input"])
        assert rec.messages[1]["content"] == row["response"]
    assert rows[0]["context"] and "\n\nVirgin Australia" in FORMATS["dolly"].map_row(rows[0])["messages"][0]["content"]


def test_sharegpt_rows():
    rows = _rows("sharegpt_dummy.json")
    for row in rows:
        out = FORMATS["sharegpt"].map_row(row)
        assert out["id"] == row["id"] and out["images"] == [] and out["meta"] == {}
        assert [m["content"] for m in out["messages"]] == [t["value"] for t in row["conversations"]]
        roles = [m["role"] for m in out["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
    out = FORMATS["sharegpt"].map_row({**rows[0], "system": "You are Vicuna.", "model": "vicuna",
                                       "conversations": [{"from": "system", "value": "S"}, *rows[0]["conversations"]]})
    assert [m["role"] for m in out["messages"]][:2] == ["system", "system"] and out["meta"] == {"model": "vicuna"}


def test_llava_rows():
    rows = _rows("llava_mix.json")
    vqa, multi, text = (FORMATS["llava"].map_row(r) for r in rows)
    assert vqa["id"] == "458752" and vqa["images"] == ["images/vqav2/COCO_train2014_000000458752.jpg"]
    assert vqa["messages"][0]["content"].startswith("<image>\nWhat is this photo taken looking through?")
    assert multi["images"] == ["mllm_demo_data/1.jpg", "mllm_demo_data/1.jpg"]
    assert text["images"] == []
    for out in (vqa, multi, text):
        validate_record(out)  # placeholder counts match


def test_messages_rows():
    rows = _rows("mllm_demo.json")
    assert len(rows) == 6
    for row in rows:
        out = FORMATS["messages"].map_row(row)
        assert out["messages"] == row["messages"] and out["images"] == row["images"] and out["id"] is None
        validate_record({**out, "id": "x"})
    out = FORMATS["messages"].map_row({"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]})
    assert [m["role"] for m in out["messages"]] == ["user", "assistant"]


@pytest.mark.parametrize(
    "row, field, reason",
    [
        ({"id": "a"}, "messages", "missing required field"),
        ({"messages": "hi"}, "messages", "non-empty list"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing required field"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "missing required field"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "unsupported speaker 'tool'"),
        # a list is read as parts ({type: text, text} / {type: image}); anything else in it is an error
        ({"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content[0]", "must be {type: text"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "must be a string, got a number"),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages", "no assistant turn"),
        ({"messages": [[]]}, "messages[0]", "must be an object"),
        ({"id": 1.5, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
         "id", "string or an integer"),
        ({"images": {"a": 1}, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
         "images", "path string or a list"),
    ],
)
def test_messages_row_errors(row, field, reason):
    with pytest.raises(RowError) as info:
        FORMATS["messages"].map_row(row)
    assert info.value.field == field and reason in info.value.reason


def test_unified_rows_pass_through():
    for row in _rows("unified.jsonl"):
        assert FORMATS["unified"].map_row(row) == row
        validate_record(row)


def _vqa_row(**ann_extra):
    q = json.loads((FIX / "vqav2" / "questions.json").read_text())
    a = json.loads((FIX / "vqav2" / "annotations.json").read_text())
    return {"question": q["questions"][0], "annotation": {**a["annotations"][0], **ann_extra},
            "data_subtype": q["data_subtype"], "task": "vqav2"}


def test_vqa_row_trimmed_and_official_annotations():
    out = FORMATS["vqa"].map_row(_vqa_row())
    assert out["id"] == "458752000" and out["images"] == ["COCO_train2014_000000458752.jpg"]
    assert out["messages"] == [{"role": "user", "content": "<image>\nWhat is this photo taken looking through?"},
                               {"role": "assistant", "content": "net"}]  # most common of the 10 answers
    assert out["answers"] == ["net", "net", "net", "netting", "net", "net", "mesh", "net", "pitcher", "orange"]
    assert out["meta"]["answer_from"] == "most common of answers" and out["meta"]["image_id"] == 458752
    # The official release carries multiple_choice_answer and the question / answer types.
    out = FORMATS["vqa"].map_row(_vqa_row(multiple_choice_answer="netting", question_type="what is",
                                          answer_type="other", image_id=458752))
    assert out["messages"][1]["content"] == "netting" and "answer_from" not in out["meta"]
    assert out["meta"] == {"question_id": 458752000, "image_id": 458752, "question_type": "what is",
                           "answer_type": "other", "split": "train2014"}
    with pytest.raises(RowError, match="no annotation for question_id 458752000"):
        FORMATS["vqa"].map_row({**_vqa_row(), "annotation": None})
    with pytest.raises(RowError) as info:
        FORMATS["vqa"].map_row(_vqa_row(answers=[{"answer": 3}]))
    assert info.value.field == "answers[0]"


def test_vqa_image_names():
    assert vqa_image_name("val2014", 262148) == "COCO_val2014_000000262148.jpg"
    assert vqa_image_name("test-dev2015", 1) == "COCO_test2015_000000000001.jpg"


def test_gqa_rows():
    inp = read_input(FIX / "gqa" / "question_dir" / "questions1.json")
    (row,) = formats.gqa_rows(inp)
    out = FORMATS["gqa"].map_row(row.data)
    assert out["id"] == "20240871" and out["images"] == ["n166008.jpg"] and out["answers"] == ["yes"]
    assert out["messages"][0]["content"] == "<image>\nDoes the table below the water look wooden and round?"
    assert out["meta"]["fullAnswer"] and out["meta"]["question_id"] == "20240871" and "question" not in out["meta"]
    with pytest.raises(RowError) as info:
        FORMATS["gqa"].map_row({k: v for k, v in row.data.items() if k != "answer"})
    assert info.value.field == "answer"
