"""Benchmark question files in their released layouts -> unified eval records; MMBench submission files.

    mmtune benchmark mme     MME_Benchmark_release_version   --out data/mme.jsonl
    mmtune benchmark mmbench mmbench_dev_20230712.tsv        --out data/mmbench.jsonl --images-out data/mmb_img
    mmtune benchmark textvqa TextVQA_0.5.1_val.json          --out data/textvqa.jsonl \\
        --ocr TextVQA_Rosetta_OCR_v0.2_val.json --image-root train_images
    mmtune benchmark seed    SEED-Bench.json                 --out data/seed.jsonl --image-root SEED-Bench-image

Importers (registry `IMPORTERS`, name -> function) read:

* `mme`: the MME release folder: one folder per subtask holding either
  `<name>.txt` next to `<name>.jpg|png`, or `questions_answers_YN/<name>.txt`
  and `images/<name>.*`; each txt line is `question<TAB>Yes|No` (two per
  image). Records: task `mme`, answers [Yes|No], `meta.mme_subtask`,
  `meta.mme_image`, `meta.category`.
* `mmbench`: MMBench's TSV (`index, question, hint, A..E, answer, category,
  l2-category, image` as base64, or the index of a row with the same image).
  Each question becomes one record per rotation of its options (CircularEval;
  `--no-circular` keeps round 0 only): ids `mmbench-<index>-r<k>`, choices in
  that rotation's order, answers [gold option text], `meta.circular_index`,
  `circular_round`, `answer_letter`, `category`, `l2_category`, and the
  question/hint for the submission file. Images are decoded into
  `--images-out`. Rows whose index is >= 1,000,000 are circular copies
  already in the file; they are counted and left out (rotations are
  generated from the base row).
* `textvqa`: TextVQA's JSON (`{"data": [{question_id, question, image_id,
  answers}]}`), OCR tokens from the entry's `ocr_tokens` or from a Rosetta
  OCR file (`--ocr`, `{"data": [{image_id, ocr_tokens}]}`) into
  `meta.ocr_tokens`; images `<image_id>.jpg`.
* `seed`: SEED-Bench's JSON (`{"questions": [{question_id, question,
  choice_a..choice_d, answer, data_id, data_type, question_type_id}],
  "question_type": {name: id}}`); image questions only (video ones are
  counted and left out); `meta.question_type` is the dimension's name.

Bad rows never stop an import: each becomes a reject naming the file, line
or row and field, written to `<out>.rejects.jsonl`; every left-out row is counted.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtune.data.schema import IMAGE_PLACEHOLDER, Record
from mmtune.errors import MMTuneError
from mmtune.fileio import atomic_path, atomic_text, write_bytes_atomic

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".PNG", ".JPEG")
CIRCULAR_OFFSET = 1_000_000  # MMBench numbers circular copies index + k * 1e6
MMBENCH_OPTIONS = "ABCDE"


@dataclass
class Imported:
    """What an importer made: records, rejects (where, id, field, reason) and counted left-outs."""

    records: list[Record] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    left_out: Counter[str] = field(default_factory=Counter)

    def reject(self, where: str, reason: str, *, rid: str | None = None, fld: str | None = None) -> None:
        self.rejects.append({"where": where, "id": rid, "field": fld, "reason": reason})

    def objects(self, items: list[Any], where: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(`where[i]`, item) for each JSON object in `items`; any other item is rejected there."""
        for i, item in enumerate(items):
            if isinstance(item, dict):
                yield f"{where}[{i}]", item
            else:
                self.reject(f"{where}[{i}]", "expected an object")


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{text}"}]


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise MMTuneError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise MMTuneError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None


# --------------------------------------------------------------------------- #
# MME
# --------------------------------------------------------------------------- #


def import_mme(source: str | Path, **_: Any) -> Imported:
    """The MME release folder -> one record per question (two per image)."""
    root = Path(source)
    if not root.is_dir():
        raise MMTuneError(f"{root}: expected the MME release folder (one folder per subtask)")
    out = Imported()
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        qa_dir, img_dir = sub, sub
        if (sub / "questions_answers_YN").is_dir():
            qa_dir, img_dir = sub / "questions_answers_YN", sub / "images"
        txts = sorted(qa_dir.glob("*.txt"))
        if not txts:
            out.left_out[f"folder without question files: {sub.name}"] += 1
            continue
        for txt in txts:
            image = next((img_dir / (txt.stem + e) for e in IMAGE_EXTS if (img_dir / (txt.stem + e)).is_file()), None)
            if image is None:
                out.reject(str(txt), f"no image {txt.stem}.jpg/.png in {img_dir}", fld="image")
                continue
            try:
                lines = txt.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                out.reject(str(txt), f"cannot read ({exc})")
                continue
            k = 0
            for lineno, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                parts = line.split("\t")
                rid = f"mme/{sub.name}/{txt.stem}/{k}"
                if len(parts) != 2:
                    out.reject(f"{txt}:{lineno}", f"expected 'question<TAB>answer', got {len(parts)} field(s)", rid=rid)
                    continue
                question, answer = parts[0].strip(), parts[1].strip()
                if answer.lower() not in ("yes", "no"):
                    out.reject(f"{txt}:{lineno}", f"answer must be Yes or No, got {answer!r}", rid=rid, fld="answer")
                    continue
                out.records.append(Record(
                    id=rid, messages=_user(question), images=[str(image)], source="mme", task="mme",
                    answers=[answer],
                    meta={"mme_subtask": sub.name, "mme_image": f"{sub.name}/{image.name}", "category": sub.name},
                ))
                k += 1
    return out


# --------------------------------------------------------------------------- #
# MMBench
# --------------------------------------------------------------------------- #


def _cell(row: dict[str, Any], key: str) -> str | None:
    """A TSV cell, with pandas' empty markers (blank, nan, NaN, None) read as missing."""
    v = row.get(key)
    if v is None:
        return None
    v = str(v)
    return None if v.strip() in ("", "nan", "NaN", "None") else v


def _image_ext(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        fmt = (im.format or "PNG").lower()
    return {"jpeg": ".jpg"}.get(fmt, f".{fmt}")


def import_mmbench(source: str | Path, *, images_out: str | Path | None = None, circular: bool = True,
                   **_: Any) -> Imported:
    """MMBench's TSV -> one record per rotation of each question's options (images decoded to files)."""
    path = Path(source)
    images = Path(images_out) if images_out else path.with_name(path.stem + "_images")
    out = Imported()
    csv.field_size_limit(sys.maxsize)  # base64 images are far larger than csv's default cell limit
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MMTuneError(f"{path}: cannot read as a TSV ({exc})") from None
    if not rows or not {"index", "question", "A", "B"} <= set(rows[0]):
        raise MMTuneError(f"{path}: not MMBench's TSV layout (needs columns index, question, A, B, ...)")
    by_index = {str(r.get("index")): r for r in rows}
    images.mkdir(parents=True, exist_ok=True)
    for lineno, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path}:{lineno}"
        try:
            index = int(float(row["index"]))
        except (TypeError, ValueError):
            out.reject(where, f"index must be an integer, got {row.get('index')!r}", fld="index")
            continue
        if index >= CIRCULAR_OFFSET:
            out.left_out["circular copy in the file (rotations are generated from the base row)"] += 1
            continue
        question = _cell(row, "question")
        options = [(c, _cell(row, c)) for c in MMBENCH_OPTIONS if c in row]
        options = [(c, t) for c, t in options if t is not None]
        if question is None or len(options) < 2:
            out.reject(where, "needs a question and at least options A and B", rid=str(index),
                       fld="question" if question is None else "A/B")
            continue
        if [c for c, _ in options] != list(MMBENCH_OPTIONS[: len(options)]):
            out.reject(where, "options must be consecutive from A", rid=str(index), fld="options")
            continue
        answer = _cell(row, "answer")
        letters = [c for c, _ in options]
        if answer is not None and answer.strip() not in letters:
            out.reject(where, f"answer {answer!r} is not one of {'/'.join(letters)}", rid=str(index), fld="answer")
            continue
        img_cell = _cell(row, "image")
        img_name = str(index)
        if img_cell is not None and len(img_cell) <= 64 and img_cell.strip() in by_index:
            img_name = img_cell.strip()  # a reference to another row's image: one file for both
            img_cell = _cell(by_index[img_name], "image")
        if img_cell is None:
            out.reject(where, "no image", rid=str(index), fld="image")
            continue
        try:
            data = base64.b64decode(img_cell, validate=False)
            img_path = images / f"{img_name}{_image_ext(data)}"
        except (binascii.Error, ValueError, OSError) as exc:
            out.reject(where, f"image is not a base64-encoded picture ({str(exc).splitlines()[0]})", rid=str(index),
                       fld="image")
            continue
        if not img_path.exists():
            write_bytes_atomic(data, img_path)
        hint = _cell(row, "hint")
        text = (hint + "\n" if hint else "") + question
        texts = [t for _, t in options]
        gold = letters.index(answer.strip()) if answer else None
        meta_base = {"circular_index": index, "category": _cell(row, "category"),
                     "l2_category": _cell(row, "l2-category") or _cell(row, "l2_category"),
                     "question": question, "hint": hint, "split": _cell(row, "split")}
        for r in range(len(texts) if circular else 1):
            rotated = texts[r:] + texts[:r]
            letter = None if gold is None else letters[(gold - r) % len(texts)]
            out.records.append(Record(
                id=f"mmbench-{index}-r{r}", messages=_user(text), images=[str(img_path)], source="mmbench",
                task="mmbench", choices=rotated, answers=None if gold is None else [texts[gold]],
                meta={**meta_base, "circular_round": r, "answer_letter": letter},
            ))
    return out


def write_mmbench_submission(records: Sequence[Record], rows: Sequence[dict[str, Any]], path: Path) -> list[Path]:
    """Predictions in MMBench's submission layout: one row per rotation, circular index = index + round x 1e6.

    Columns: index, question, hint, A..E (that rotation's order), answer
    (gold letter when known), prediction (the raw model output), category,
    l2-category. Written as TSV, and as .xlsx (what the MMBench server takes)
    when openpyxl is installed.
    """
    by_id = {r["id"]: r for r in rows}
    n_opt = max((len(r.choices or []) for r in records), default=4)
    cols = ["index", "question", "hint", *MMBENCH_OPTIONS[:n_opt], "answer", "prediction", "category", "l2-category"]
    table = []
    for rec in records:
        m = rec.meta
        row = by_id.get(rec.id, {})
        line = {"index": int(m.get("circular_index", 0)) + CIRCULAR_OFFSET * int(m.get("circular_round", 0)),
                "question": m.get("question") or "", "hint": m.get("hint") or "",
                "answer": m.get("answer_letter") or "", "prediction": row.get("output", ""),
                "category": m.get("category") or "", "l2-category": m.get("l2_category") or ""}
        for i, c in enumerate(MMBENCH_OPTIONS[:n_opt]):
            line[c] = (rec.choices or [])[i] if i < len(rec.choices or []) else ""
        table.append(line)
    tsv = path.with_suffix(".tsv")
    with atomic_text(tsv, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, delimiter="\t")
        w.writeheader()
        w.writerows(table)
    written = [tsv]
    try:
        import openpyxl
    except ImportError:
        return written
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(cols)
    for line in table:
        ws.append([line[c] for c in cols])
    xlsx = path.with_suffix(".xlsx")
    with atomic_path(xlsx) as tmp:
        wb.save(tmp)
    written.append(xlsx)
    return written


# Metric -> writer of a benchmark's own submission file (called by `mmtune eval` per model, task and mode).
SUBMISSION_WRITERS: dict[str, Callable[[Sequence[Record], Sequence[dict[str, Any]], Path], list[Path]]] = {
    "mmbench_circular": write_mmbench_submission,
}


# --------------------------------------------------------------------------- #
# TextVQA
# --------------------------------------------------------------------------- #


def import_textvqa(source: str | Path, *, ocr: str | Path | None = None, image_root: str | Path | None = None,
                   **_: Any) -> Imported:
    """TextVQA's JSON (+ optional Rosetta OCR JSON) -> records with 10 answers and `meta.ocr_tokens`."""
    path = Path(source)
    top = _load_json(path)
    if not isinstance(top, dict) or not isinstance(top.get("data"), list):
        raise MMTuneError(f"{path}: not TextVQA's layout (expected {{\"data\": [...]}})")
    ocr_by_image: dict[str, list[str]] = {}
    if ocr is not None:
        o = _load_json(Path(ocr))
        if not isinstance(o, dict) or not isinstance(o.get("data"), list):
            raise MMTuneError(f"{ocr}: not a TextVQA OCR file (expected {{\"data\": [{{image_id, ocr_tokens}}]}})")
        for e in o["data"]:
            if isinstance(e, dict) and isinstance(e.get("ocr_tokens"), list):
                ocr_by_image[str(e.get("image_id"))] = [str(t) for t in e["ocr_tokens"]]
    out = Imported()
    for where, e in out.objects(top["data"], f"{path} data"):
        qid, q, img = e.get("question_id"), e.get("question"), e.get("image_id")
        if qid is None or not isinstance(q, str) or not q.strip() or not isinstance(img, str):
            out.reject(where, "needs question_id, question (text) and image_id", rid=None if qid is None else str(qid),
                       fld="question_id" if qid is None else "question" if not isinstance(q, str) else "image_id")
            continue
        answers = e.get("answers")
        if answers is not None and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
            out.reject(where, "answers must be a list of strings", rid=str(qid), fld="answers")
            continue
        tokens = e.get("ocr_tokens") if isinstance(e.get("ocr_tokens"), list) else ocr_by_image.get(img)
        image = str(Path(image_root) / f"{img}.jpg") if image_root else f"{img}.jpg"
        meta: dict[str, Any] = {"image_id": img}
        if tokens is not None:
            meta["ocr_tokens"] = [str(t) for t in tokens]
        out.records.append(Record(id=str(qid), messages=_user(q.strip()), images=[image], source="textvqa",
                                  task="textvqa", answers=list(answers) if answers else None, meta=meta))
    return out


# --------------------------------------------------------------------------- #
# SEED-Bench
# --------------------------------------------------------------------------- #

SEED_CHOICE_KEYS = ("choice_a", "choice_b", "choice_c", "choice_d")


def import_seed(source: str | Path, *, image_root: str | Path | None = None, **_: Any) -> Imported:
    """SEED-Bench's JSON -> image multiple-choice records with `meta.question_type` (the dimension)."""
    path = Path(source)
    top = _load_json(path)
    if not isinstance(top, dict) or not isinstance(top.get("questions"), list):
        raise MMTuneError(f"{path}: not SEED-Bench's layout (expected {{\"questions\": [...], \"question_type\": ...}})")
    names = {v: k for k, v in (top.get("question_type") or {}).items()}
    out = Imported()
    for where, q in out.objects(top["questions"], f"{path} questions"):
        rid = str(q.get("question_id", ""))
        if q.get("data_type", "image") != "image":
            out.left_out[f"{q.get('data_type')} question (image questions only)"] += 1
            continue
        choices = [q.get(k) for k in SEED_CHOICE_KEYS]
        missing = next((k for k, c in zip(SEED_CHOICE_KEYS, choices) if not isinstance(c, str)), None)
        if not rid or not isinstance(q.get("question"), str) or missing or not isinstance(q.get("data_id"), str):
            fld = "question_id" if not rid else "question" if not isinstance(q.get("question"), str) else \
                missing or "data_id"
            out.reject(where, f"missing or non-text field {fld!r}", rid=rid or None, fld=fld)
            continue
        answer = q.get("answer")
        if answer is not None and answer not in "ABCD"[: len(choices)]:
            out.reject(where, f"answer must be A-D, got {answer!r}", rid=rid, fld="answer")
            continue
        tid = q.get("question_type_id")
        image = str(Path(image_root) / q["data_id"]) if image_root else q["data_id"]
        out.records.append(Record(
            id=rid, messages=_user(q["question"].strip()), images=[image], source="seed", task="seed",
            choices=[str(c) for c in choices], answers=[answer] if answer else None,
            meta={"question_type": names.get(tid, str(tid)), "question_type_id": tid,
                  "category": names.get(tid, str(tid))},
        ))
    return out


IMPORTERS: dict[str, Callable[..., Imported]] = {
    "mme": import_mme,
    "mmbench": import_mmbench,
    "textvqa": import_textvqa,
    "seed": import_seed,
}
