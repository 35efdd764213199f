"""`mmtune convert` end to end: every input row ends up converted or rejected with its location."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmtune.cli import main
from mmtune.data.convert import ConvertResult, convert_files, default_rejects_path
from mmtune.data.schema import IMAGE_PLACEHOLDER, read_records

from conftest import SHARED_DATA

FIX = Path(__file__).parent / "fixtures" / "data"
SHARED = SHARED_DATA


def convert(capsys, *args: str | Path) -> tuple[int, str, str]:
    rc = main(["convert", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def rejects_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def check_images(records) -> None:
    for rec in records:
        assert sum(m["content"].count(IMAGE_PLACEHOLDER) for m in rec.messages) == len(rec.images)
        for img in rec.images:
            assert Path(img).is_absolute() and Path(img).is_file()


# --------------------------------------------------------------------------- #
# the real files in ../shared (present on the dev machine and in CI only)
# --------------------------------------------------------------------------- #


def _shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"{path} not present (real data lives in ../shared next to the repo)")
    return path


@pytest.mark.parametrize(
    "rel, fmt, n",
    [
        ("llama_factory/alpaca_en_demo.json", "alpaca", 999),
        ("llama_factory/mllm_demo.json", "messages", 6),
        ("fastchat/dummy_conversation.json", "sharegpt", 500),
    ],
)
def test_shared_real_files(capsys, tmp_path, rel, fmt, n):
    src = _shared(rel)
    out = tmp_path / "out.jsonl"
    rc, stdout, _ = convert(capsys, src, "--out", out)
    assert rc == 0 and f"{src}: {fmt}, {n} rows" in stdout and f"converted {n}, rejected 0" in stdout
    records = read_records(out)
    assert len(records) == n and len({r.id for r in records}) == n
    check_images(records)
    if fmt == "messages":
        assert sum(len(r.images) for r in records) == 8  # two chats show their image twice
    if fmt == "alpaca":
        from mmtune.data.templates import alpaca_user

        assert all(r.messages[0]["content"] == alpaca_user(r.meta["instruction"], r.meta.get("input"))
                   for r in records)
    assert not default_rejects_path(out).exists()


# --------------------------------------------------------------------------- #
# every format on the fixtures
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "inputs, extra, fmt, n",
    [
        (["alpaca_en_demo.head.json"], [], "alpaca", 6),
        (["dolly.head.jsonl"], [], "dolly", 5),
        (["sharegpt_dummy.json"], [], "sharegpt", 3),
        (["llava_mix.json"], [], "llava", 3),
        (["mllm_demo.json"], [], "messages", 6),
        (["unified.jsonl"], [], "unified", 3),
        (["vqav2/questions.json", "vqav2/annotations.json"], ["--image-root", FIX / "images" / "vqav2"], "vqa", 3),
        (["gqa/question_dir"], ["--image-root", FIX / "images" / "gqa"], "gqa", 2),
    ],
)
def test_fixture_formats(capsys, tmp_path, inputs, extra, fmt, n):
    out = tmp_path / "out.jsonl"
    rc, stdout, _ = convert(capsys, *(FIX / i for i in inputs), "--out", out, *extra)
    assert rc == 0 and f"converted {n}, rejected 0" in stdout and f": {fmt}" in stdout
    records = read_records(out)
    assert len(records) == n
    check_images(records)


def test_vqa_records(capsys, tmp_path):
    out = tmp_path / "vqa.jsonl"
    rc, _, _ = convert(capsys, FIX / "vqav2" / "annotations.json", FIX / "vqav2" / "questions.json",
                       "--out", out, "--image-root", FIX / "images" / "vqav2")
    assert rc == 0
    recs = {r.id: r for r in read_records(out)}
    rec = recs["458752001"]
    assert rec.messages == [{"role": "user", "content": "<image>\nWhat position is this man playing?"},
                            {"role": "assistant", "content": "pitcher"}]
    assert len(rec.answers) == 10 and rec.answers.count("catcher") == 1
    assert rec.images == [str(FIX / "images" / "vqav2" / "COCO_train2014_000000458752.jpg")]
    assert rec.task == "vqav2" and rec.source == "vqav2"
    assert {"question_id", "image_id", "question_type", "answer_type"} <= set(rec.meta)
    assert rec.meta["question_id"] == 458752001 and rec.meta["image_id"] == 458752


def test_vqa_images_in_the_official_split_folder(capsys, tmp_path):
    # The official COCO layout keeps images in train2014/ under the image root.
    (tmp_path / "coco" / "train2014").mkdir(parents=True)
    shutil.copy(FIX / "images" / "vqav2" / "COCO_train2014_000000458752.jpg", tmp_path / "coco" / "train2014")
    out = tmp_path / "vqa.jsonl"
    rc, stdout, _ = convert(capsys, FIX / "vqav2", "--out", out, "--image-root", tmp_path / "coco")
    assert rc == 0 and "converted 3, rejected 0" in stdout
    assert read_records(out)[0].images == [str(tmp_path / "coco" / "train2014" / "COCO_train2014_000000458752.jpg")]
    rc, stdout, _ = convert(capsys, FIX / "vqav2", "--out", out, "--image-root", tmp_path)
    reasons = [r["reason"] for r in rejects_of(default_rejects_path(out))]
    assert "converted 0, rejected 3" in stdout and len(reasons) == 3
    assert "image not found" in reasons[0] and f"also looked in {tmp_path / 'train2014'}" in reasons[0]


def test_vqa_unmatched_questions_and_annotations_are_rejects(capsys, tmp_path):
    q = json.loads((FIX / "vqav2" / "questions.json").read_text())
    a = json.loads((FIX / "vqav2" / "annotations.json").read_text())
    q["questions"].append({"image_id": 458752, "question": "Is it sunny?", "question_id": 999})
    a["annotations"].append({**a["annotations"][0], "question_id": 12345})
    a["annotations"].append("not an annotation")
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    out = tmp_path / "vqa.jsonl"
    res = convert_files([tmp_path / "q.json", tmp_path / "a.json"], image_root=FIX / "images" / "vqav2",
                        rejects_path=default_rejects_path(out), progress=False)
    assert len(res.records) == 3 and res.rejects_count == 3 and res.input_rows == 6
    reasons = [r.reason for r in res.rejects]
    assert reasons[0].startswith(f"{tmp_path / 'q.json'}[questions][3], record '999', field 'annotation': no annotation")
    assert reasons[1].startswith(f"{tmp_path / 'a.json'}[annotations][4]: expected a JSON object")
    assert reasons[2] == f"{tmp_path / 'a.json'}[annotations][3]: annotation for question_id 12345 matches no question in the input question files"
    assert [r["index"] for r in rejects_of(default_rejects_path(out))] == [3, 4, 3]


@pytest.mark.parametrize("name", ["questions.json", "annotations.json"])
def test_vqa_half_a_pair_is_an_error(capsys, tmp_path, name):
    rc, _, err = convert(capsys, FIX / "vqav2" / name, "--out", tmp_path / "o.jsonl")
    assert rc == 2 and err.count("\n") == 1
    assert ("pass both" if name == "annotations.json" else "needs its annotations file among the inputs") in err


def test_gqa_duplicate_id_across_inputs(capsys, tmp_path):
    out = tmp_path / "gqa.jsonl"
    # gqa/questions.json and gqa/question_dir/questions0.json hold the same question.
    rc, stdout, _ = convert(capsys, FIX / "gqa", FIX / "gqa" / "question_dir", "--out", out,
                            "--image-root", FIX / "images" / "gqa")
    assert rc == 0 and "converted 2, rejected 1" in stdout
    (rej,) = rejects_of(default_rejects_path(out))
    q0 = FIX / "gqa" / "question_dir" / "questions0.json"
    assert rej["source"] == str(q0) and rej["index"] == "202218649"
    assert rej["reason"] == (f"{q0}[202218649], record '202218649', field 'id': "
                             f"duplicate id (first at {FIX / 'gqa' / 'questions.json'}[202218649])")
    rec = read_records(out)[0]
    assert rec.answers == ["picture"] and rec.task == "gqa" and rec.meta["imageId"] == "n578564"


# --------------------------------------------------------------------------- #
# broken inputs: nothing crashes, nothing is lost
# --------------------------------------------------------------------------- #

MIXED_EXPECTED = {
    3: "mixed_llava.jsonl:3: bad JSON (Expecting ',' delimiter",
    4: "record 'no-conversations', field 'conversations': missing required field",
    5: "record 'wrong-type', field 'conversations[1].value': must be a string, got a number",
    6: "record 'mismatch', field 'images': 0 <image> placeholder(s) but 1 image(s)",
    7: "record '997bb945-628d-4724-b370-b84de974a19f', field 'images[0]': image not found: ",
    8: "record 'corrupt-image', field 'images[0]': image cannot be decoded: ",
    9: "record 'empty-answer', field 'messages[1].content': empty assistant turn",
    10: "record 'identity_4', field 'id': duplicate id (first at ",
    11: "mixed_llava.jsonl:11: expected a JSON object, got a list",
    12: "record 'unknown-speaker', field 'conversations[1].from': unsupported speaker 'bot'",
    15: "record 'question-only', field 'conversations': no assistant turn",
    16: "record 'image-not-a-path', field 'image': must be a path string or a list of them, got a number",
}


def test_mixed_good_and_broken_rows(capsys, tmp_path):
    src = FIX / "broken" / "mixed_llava.jsonl"
    out = tmp_path / "out.jsonl"
    rc, stdout, _ = convert(capsys, src, "--out", out)
    assert rc == 0 and "converted 3, rejected 12" in stdout and f"rejects in {default_rejects_path(out)}" in stdout
    assert [r.id for r in read_records(out)] == ["identity_4", "458752", "mllm_demo-2"]
    check_images(read_records(out))
    rejects = rejects_of(default_rejects_path(out))
    assert [r["index"] for r in rejects] == list(MIXED_EXPECTED)
    for rej in rejects:
        assert rej["source"] == str(src)
        assert rej["reason"].startswith(f"{src}:{rej['index']}")
        assert MIXED_EXPECTED[rej["index"]] in rej["reason"] and "\n" not in rej["reason"]
    lines = src.read_text().splitlines()
    assert rejects[1]["raw"] == json.loads(lines[3]) and rejects[0]["raw"] == lines[2]  # a bad line's text
    n_rows = sum(1 for line in lines if line.strip())
    assert 3 + len(rejects) == n_rows


def test_array_elements_are_located_by_index(capsys, tmp_path):
    src = FIX / "broken" / "alpaca_array.json"
    out = tmp_path / "out.jsonl"
    rc, stdout, _ = convert(capsys, src, "--out", out, "--rejects", tmp_path / "bad.jsonl")
    assert rc == 0 and "converted 2, rejected 6" in stdout
    assert [r.id for r in read_records(out)] == ["alpaca_array-0", "alpaca_array-1"]
    rejects = rejects_of(tmp_path / "bad.jsonl")
    assert [r["index"] for r in rejects] == [2, 3, 4, 5, 6, 7]
    expected = [
        "[2]: expected a JSON object, got a string",
        "[3], record 'alpaca_array-3', field 'output': missing required field",
        "[4], record 'alpaca_array-4', field 'input': must be a string, got a list",
        "[5], record 'alpaca_array-5', field 'messages[1].content': empty assistant turn",
        "[6], record 'alpaca_array-6', field 'instruction': empty instruction",
        "[7], record 'alpaca_array-7', field 'images': 1 <image> placeholder(s) but 0 image(s)",
    ]
    assert [r["reason"] for r in rejects] == [f"{src}{e}" for e in expected]
    assert not default_rejects_path(out).exists()


def test_strict_exits_nonzero_with_the_first_reason(capsys, tmp_path):
    out = tmp_path / "out.jsonl"
    rc, stdout, err = convert(capsys, FIX / "broken" / "alpaca_array.json", "--out", out, "--strict")
    assert rc == 1 and "converted 2, rejected 6" in stdout
    assert "first reject:" in err and "alpaca_array.json[2]: expected a JSON object" in err
    assert len(read_records(out)) == 2  # the good rows are still written
    rc, _, err = convert(capsys, FIX / "dolly.head.jsonl", "--out", out, "--strict")
    assert rc == 0 and err == ""


@pytest.mark.parametrize(
    "content, message",
    [("instruction,output\nSay hi,hi\n", "not valid JSON or JSONL"), ('[{"instruction": "a", "output": "b"},', "not valid JSON (line 1")],
)
def test_not_json_is_a_one_line_error(capsys, tmp_path, content, message):
    src = tmp_path / "data.jsonl"
    src.write_text(content)
    rc, _, err = convert(capsys, src, "--out", tmp_path / "o.jsonl")
    assert rc == 2 and err.startswith(f"mmtune convert: error: {src}: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["alpaca_en_demo.head.json", "--format", "vqa"], "--format vqa expects the official VQA JSON object"),
        (["vqav2/questions.json", "--format", "alpaca"], "--format alpaca expects a JSON array or JSONL of rows"),
        (["vqav2/questions.json", "--format", "gqa"], "this is a VQA questions file"),
        (["gqa/questions.json", "--format", "vqa"], "expects a VQA questions or annotations file"),
        (["no_such_file.json"], "no_such_file.json: no such file or folder"),
        (["images"], "images: folder has no .json, .jsonl, .parquet or .arrow files"),
    ],
)
def test_input_errors(capsys, tmp_path, args, message):
    rc, _, err = convert(capsys, *(FIX / a if i == 0 else a for i, a in enumerate(args)), "--out", tmp_path / "o.jsonl")
    assert rc == 2 and message in err and err.count("\n") == 1


def test_out_may_not_overwrite_an_input(capsys, tmp_path):
    src = tmp_path / "in.jsonl"
    shutil.copy(FIX / "dolly.head.jsonl", src)
    rc, _, err = convert(capsys, src, "--out", src)
    assert rc == 2 and "is also an input" in err
    assert src.read_text() == (FIX / "dolly.head.jsonl").read_text()


def test_explicit_wrong_row_format_rejects_every_row(capsys, tmp_path):
    out = tmp_path / "o.jsonl"
    rc, stdout, _ = convert(capsys, FIX / "sharegpt_dummy.json", "--format", "dolly", "--out", out)
    assert rc == 0 and "converted 0, rejected 3" in stdout
    assert all("field 'instruction': missing required field" in r["reason"] for r in rejects_of(default_rejects_path(out)))


def test_unified_rows_are_validated(capsys, tmp_path):
    rows = [json.loads(line) for line in (FIX / "unified.jsonl").read_text().splitlines()]
    bad = [{**rows[0], "id": "extra", "question": "?"}, {k: v for k, v in rows[0].items() if k != "id"}]
    src = tmp_path / "pool.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows + bad))
    rc, stdout, _ = convert(capsys, src, "--format", "unified", "--image-root", FIX, "--out", tmp_path / "o.jsonl")
    assert rc == 0 and "converted 3, rejected 2" in stdout
    reasons = [r["reason"] for r in rejects_of(tmp_path / "o.rejects.jsonl")]
    assert "record 'extra', field 'question': unknown field(s)" in reasons[0]
    assert f"{src}:5, field 'id': missing required field" == reasons[1]
    assert read_records(tmp_path / "o.jsonl")[0].source == "alpaca_en_demo.head"  # its own source is kept


def test_image_root_option(capsys, tmp_path):
    out = tmp_path / "o.jsonl"
    rc, stdout, _ = convert(capsys, FIX / "mllm_demo.json", "--out", out, "--image-root", tmp_path)
    assert "converted 0, rejected 6" in stdout
    assert all(f"image not found: {tmp_path / 'mllm_demo_data'}" in r["reason"] for r in rejects_of(default_rejects_path(out)))
    copy = tmp_path / "data"
    shutil.copytree(FIX / "mllm_demo_data", copy / "mllm_demo_data")
    rc, stdout, _ = convert(capsys, FIX / "mllm_demo.json", "--out", out, "--image-root", copy)
    assert "converted 6, rejected 0" in stdout
    assert read_records(out)[1].images == [str(copy / "mllm_demo_data" / "2.jpg")]
    assert not default_rejects_path(out).exists()  # the stale rejects file of the first run is gone


def test_urls_are_kept_and_counted(capsys, tmp_path):
    src = tmp_path / "web.jsonl"
    row = json.loads((FIX / "mllm_demo.json").read_text())[0]
    row["images"] = ["https://example.org/1.jpg", "http://example.org/1.jpg"]
    src.write_text(json.dumps(row) + "\n")
    out = tmp_path / "o.jsonl"
    rc, stdout, _ = convert(capsys, src, "--out", out)
    assert rc == 0 and "converted 1, rejected 0" in stdout and "2 image URL(s) kept as they are, not checked" in stdout
    assert read_records(out)[0].images == row["images"]


def test_source_task_and_ids(capsys, tmp_path):
    out = tmp_path / "o.jsonl"
    rc, _, _ = convert(capsys, FIX / "dolly.head.jsonl", FIX / "alpaca_en_demo.head.json", "--out", out)
    recs = read_records(out)
    assert recs[0].id == "dolly.head-0" and recs[0].source == "dolly.head" and recs[0].task == "closed_qa"
    assert recs[5].id == "alpaca_en_demo.head-0" and recs[5].task is None
    rc, _, _ = convert(capsys, FIX / "dolly.head.jsonl", "--out", out, "--source", "dolly15k", "--task", "chat")
    recs = read_records(out)
    assert {(r.source, r.task) for r in recs} == {("dolly15k", "chat")} and recs[0].meta["category"] == "closed_qa"


def test_python_api(tmp_path):
    res = convert_files([FIX / "llava_mix.json", FIX / "sharegpt_dummy.json"], progress=False)
    assert isinstance(res, ConvertResult)
    assert res.formats == {str(FIX / "llava_mix.json"): "llava", str(FIX / "sharegpt_dummy.json"): "sharegpt"}
    assert len(res.records) == 6 and res.rejects == [] and res.input_rows == 6 and res.first_reject is None
    assert res.records[0].images == [str(FIX / "images" / "vqav2" / "COCO_train2014_000000458752.jpg")]
    assert default_rejects_path("a/b.jsonl") == Path("a/b.rejects.jsonl")
    assert default_rejects_path("a/b.json") == Path("a/b.json.rejects.jsonl")
