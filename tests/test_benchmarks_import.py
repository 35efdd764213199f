"""Importers for MME / MMBench / TextVQA / SEED-Bench on rows written in each benchmark's released layout.

Layouts: MME_Benchmark_release_version (subtask folders; `questions_answers_YN/` + `images/` for
artwork/celebrity/landmark/posters/scene), MMBench's `mmbench_dev_20230712.tsv` (base64 images, index >= 1e6
for circular copies), TextVQA_0.5.1_val.json + TextVQA_Rosetta_OCR_v0.2_val.json, SEED-Bench.json.
"""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from mmtune.cli import main
from mmtune.data.schema import read_records
from mmtune.eval.benchmarks import import_mmbench, import_mme, import_seed, import_textvqa


def png_bytes(colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_mme_release_folder(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    (root / "existence").mkdir(parents=True)
    (root / "existence" / "000000006040.jpg").write_bytes(png_bytes())
    (root / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n")
    (root / "existence" / "000000000001.txt").write_text("Is there a cat?\tYes\n")  # no image next to it
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "images").mkdir()
    (root / "artwork" / "images" / "10002.jpg").write_bytes(png_bytes())
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Does this artwork exist in the form of painting? Please answer yes or no.\tYes\n"
        "Does this artwork exist in the form of glassware?\tMaybe\n"
        "bad line without a tab\n")
    res = import_mme(root)
    assert [r.id for r in res.records] == ["mme/artwork/10002/0", "mme/existence/000000006040/0",
                                           "mme/existence/000000006040/1"]
    r = res.records[1]
    assert r.messages[0]["content"] == "<image>\nIs there a train in this image? Please answer yes or no."
    assert r.answers == ["Yes"] and r.task == "mme"
    assert r.meta == {"mme_subtask": "existence", "mme_image": "existence/000000006040.jpg", "category": "existence"}
    assert r.images == [str(root / "existence" / "000000006040.jpg")]
    reasons = sorted(x["reason"].split(" ")[0] for x in res.rejects)
    assert len(res.rejects) == 3 and reasons == ["answer", "expected", "no"]
    assert any(x["where"].endswith("10002.txt:3") for x in res.rejects)


def write_mmbench_tsv(path, rows):
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
            "l2-category", "comment", "split"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "nan") for c in cols})


@pytest.fixture
def mmbench_tsv(tmp_path):
    img = base64.b64encode(png_bytes()).decode()
    path = tmp_path / "mmbench_dev_20230712.tsv"
    write_mmbench_tsv(path, [
        {"index": 0, "question": "Which animal is shown?", "hint": "Look closely.", "A": "cat", "B": "dog",
         "C": "bird", "D": "fish", "answer": "B", "category": "image_scene", "image": img,
         "l2-category": "coarse_perception", "split": "dev"},
        {"index": 1, "question": "What colour?", "A": "red", "B": "blue", "C": "nan", "D": "nan", "answer": "A",
         "category": "attribute", "image": "0", "split": "dev"},           # image given as another row's index
        {"index": 2, "question": "Broken answer", "A": "x", "B": "y", "answer": "E", "image": img},
        {"index": 1000000, "question": "Which animal is shown?", "A": "dog", "B": "bird", "C": "fish", "D": "cat",
         "answer": "A", "image": img},                                       # a circular copy in the file
    ])
    return path


def test_mmbench_tsv_rotations_and_images(mmbench_tsv, tmp_path):
    res = import_mmbench(mmbench_tsv, images_out=tmp_path / "img")
    ids = [r.id for r in res.records]
    assert ids == ["mmbench-0-r0", "mmbench-0-r1", "mmbench-0-r2", "mmbench-0-r3", "mmbench-1-r0", "mmbench-1-r1"]
    r0, r1, r3 = res.records[0], res.records[1], res.records[3]
    assert r0.messages[0]["content"] == "<image>\nLook closely.\nWhich animal is shown?"
    assert r0.choices == ["cat", "dog", "bird", "fish"] and r0.meta["answer_letter"] == "B"
    assert r1.choices == ["dog", "bird", "fish", "cat"] and r1.meta["answer_letter"] == "A"
    assert r3.choices == ["fish", "cat", "dog", "bird"] and r3.meta["answer_letter"] == "C"
    assert all(r.answers == ["dog"] for r in res.records[:4])
    assert r0.meta["circular_index"] == 0 and r0.meta["l2_category"] == "coarse_perception"
    assert res.records[4].choices == ["red", "blue"] and res.records[4].images == r0.images  # shared image
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["0.png"]  # row 1 reuses row 0's image
    assert [x["field"] for x in res.rejects] == ["answer"]
    assert res.left_out == {"circular copy in the file (rotations are generated from the base row)": 1}
    assert len(import_mmbench(mmbench_tsv, images_out=tmp_path / "img", circular=False).records) == 2


def test_textvqa_json_with_rosetta_ocr(tmp_path):
    data = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
        {"question": "what is the brand of this camera?", "image_id": "003a8ae2ef43b901", "image_classes": ["Camera"],
         "question_tokens": ["what", "is"], "question_id": 34602, "set_name": "val",
         "answers": ["nous les gosses", "dakota", "clos culombu", "dakota digital"] + ["dakota"] * 6},
        {"question": "what does the small white text spell?", "image_id": "003a8ae2ef43b901", "question_id": 34603,
         "answers": ["copenhagen"] * 10, "ocr_tokens": ["COPENHAGEN", "1999"]},
        {"question_id": 34604, "image_id": "x"},
    ]}
    ocr = {"data": [{"image_id": "003a8ae2ef43b901", "ocr_tokens": ["DAKOTA", "DIGITAL"], "ocr_info": []}]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    (tmp_path / "ocr.json").write_text(json.dumps(ocr))
    res = import_textvqa(tmp_path / "TextVQA_0.5.1_val.json", ocr=tmp_path / "ocr.json", image_root="train_images")
    assert [r.id for r in res.records] == ["34602", "34603"]
    assert res.records[0].meta["ocr_tokens"] == ["DAKOTA", "DIGITAL"]
    assert res.records[1].meta["ocr_tokens"] == ["COPENHAGEN", "1999"]  # the entry's own tokens win
    assert res.records[0].images == ["train_images/003a8ae2ef43b901.jpg"] and len(res.records[0].answers) == 10
    assert res.rejects[0]["field"] == "question" and res.rejects[0]["id"] == "34604"


def test_seed_json_image_questions_with_dimensions(tmp_path):
    data = {"questions": [
        {"answer": "A", "choice_a": "One", "choice_b": "Two", "choice_c": "Three", "choice_d": "Four",
         "data_id": "1454426_2591111986.jpg", "data_type": "image", "question": "How many towels are in the image?",
         "question_id": "101669", "question_type_id": 5},
        {"answer": "C", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d", "data_id": "v.mp4",
         "data_type": "video", "question": "What happens?", "question_id": "200001", "question_type_id": 10},
        {"answer": "B", "choice_a": "a", "choice_b": "b", "choice_c": None, "choice_d": "d", "data_id": "x.jpg",
         "data_type": "image", "question": "?", "question_id": "101670", "question_type_id": 1},
    ], "question_type": {"Scene Understanding": 1, "Instances Counting": 5, "Action Recognition": 10}}
    (tmp_path / "SEED-Bench.json").write_text(json.dumps(data))
    res = import_seed(tmp_path / "SEED-Bench.json", image_root="SEED-Bench-image")
    (r,) = res.records
    assert r.id == "101669" and r.choices == ["One", "Two", "Three", "Four"] and r.answers == ["A"]
    assert r.meta["question_type"] == "Instances Counting" and r.images == ["SEED-Bench-image/1454426_2591111986.jpg"]
    assert res.left_out == {"video question (image questions only)": 1}
    assert res.rejects[0]["field"] == "choice_c"


def test_cli_import_then_score_mmbench_predictions_with_submission(mmbench_tsv, tmp_path, capsys):
    out = tmp_path / "mmb.jsonl"
    assert main(["benchmark", "mmbench", str(mmbench_tsv), "--out", str(out), "--images-out", str(tmp_path / "i")]) == 0
    assert "wrote 6 record(s)" in capsys.readouterr().out
    assert (tmp_path / "mmb.rejects.jsonl").is_file()
    assert main(["benchmark", "mmbench", str(mmbench_tsv), "--out", str(out)]) == 2  # never overwrites silently
    recs = read_records(out)
    # Right in every rotation for question 0; question 1 answered "A" in both rotations (wrong in round 1).
    preds = {r.id: r.meta["answer_letter"] for r in recs if r.meta["circular_index"] == 0}
    preds.update({"mmbench-1-r0": "A", "mmbench-1-r1": "A"})
    pfile = tmp_path / "preds.jsonl"
    pfile.write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n" for k, v in preds.items()))
    res_dir = tmp_path / "scored"
    assert main(["eval", "--predictions", str(pfile), "--records", str(out), "--preset", "mmbench",
                 "--out", str(res_dir), "--no-plot"]) == 0
    report = json.loads((res_dir / "results.json").read_text())
    e = report["results"]["predictions"]["mmbench"]["predictions"]
    assert e["score"] == 0.5 and e["details"]["vanilla_accuracy"] == 1.0 and e["counted"] == 6
    sub = res_dir / "submissions" / "predictions__mmbench.tsv"
    rows = list(csv.DictReader(sub.open(encoding="utf-8"), delimiter="\t"))
    assert [int(r["index"]) for r in rows] == [0, 1000000, 2000000, 3000000, 1, 1000001]
    assert rows[1]["A"] == "dog" and rows[1]["answer"] == "A" and rows[5]["prediction"] == "A"
    md = (res_dir / "results.md").read_text()
    # the standard error is over the 2 questions (one passed all its rotations), not over the 6 rotations
    assert e["stderr"] == pytest.approx(0.5)
    assert "| predictions | 50.00 ± 50.00 (6/6, 0 skipped) |" in md
