"""Reading a selection pool: unified JSONL, any format `mmtune convert` knows, or webdataset shards.

* Unified JSONL (first record has `id` and `messages`): read with the schema;
  any bad line is an error that counts them and names the first.
* Anything else that is a file (Alpaca / Dolly / ShareGPT / LLaVA JSON or
  JSONL, ...): converted in memory with `mmtune.data.convert.convert_files`;
  rows it rejects are an error too (run `mmtune convert` to get a rejects file).
* Shards (a .tar, a brace pattern, a shard folder): read with
  `mmtune.data.shards.iter_records`, images extracted to a temporary folder
  (the caller copies the selected ones next to the output); lost samples are
  counted skips, reported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mmtune.data.schema import Record, read_records_with_errors
from mmtune.errors import MMTuneError


class PoolError(MMTuneError):
    """A pool that cannot be read (one line)."""


@dataclass
class Pool:
    records: list[Record]
    path: str
    kind: str  # "jsonl" | "converted" | "shards"
    image_root: str | None  # where relative image paths resolve from
    skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extracted_dir: str | None = None  # shards: temporary folder holding the extracted images

    def cleanup(self) -> None:
        if self.extracted_dir and os.path.isdir(self.extracted_dir):
            shutil.rmtree(self.extracted_dir, ignore_errors=True)
            self.extracted_dir = None


def _is_shards(path: str) -> bool:
    try:
        from mmtune.data.shards import is_shard_source
    except ImportError:
        return path.endswith((".tar", ".tar.gz", ".tgz"))
    return is_shard_source(path)


def _looks_unified(path: Path) -> bool:
    """A JSONL file whose first non-blank line is an object with `id` and `messages` (BOM allowed)."""
    from mmtune.data.textio import iter_lines, parse_json

    if path.suffix.lower() != ".jsonl":
        return False
    for _, text in iter_lines(path):
        obj, reason = parse_json(text)
        if reason is not None:
            return True  # the schema reader reports the bad line with its number
        return isinstance(obj, dict) and "messages" in obj and "id" in obj
    return True  # empty file: the empty-pool error names it


def load_pool(
    path: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    fmt: str = "auto",
) -> Pool:
    """Read `path` into records (see the module docstring for what each kind of pool does)."""
    text = os.fspath(path)
    if _is_shards(text):
        return _load_shards(text)
    p = Path(text)
    if not p.exists():
        raise PoolError(f"{p}: pool not found")
    if p.is_dir():
        raise PoolError(f"{p}: is a folder; give a JSONL/JSON file or a shard folder written by `mmtune shard`")
    root = os.fspath(image_root) if image_root is not None else str(p.resolve().parent)
    if fmt in ("auto", "unified") and _looks_unified(p):
        records, errors = read_records_with_errors(p)
        if errors:
            raise PoolError(f"{p}: {len(errors)} bad line(s) in the pool (first: {errors[0].describe()})")
        return Pool(records, text, "jsonl", root)
    try:
        from mmtune.data.convert import convert_files
    except ImportError:
        raise PoolError(f"{p}: not unified JSONL and the converter is unavailable; "
                        "run `mmtune convert` first and select from its output") from None
    result = convert_files([p], fmt=fmt, image_root=image_root, progress=False)
    if result.rejects:
        raise PoolError(
            f"{p}: {len(result.rejects)} row(s) could not be converted (first: {result.rejects[0].reason}); "
            "run `mmtune convert` to write them to a rejects file and select from its output"
        )
    fmt_used = next(iter(result.formats.values()), fmt)
    return Pool(result.records, text, "converted", root, notes=[f"converted in memory from {fmt_used} format"])


def _load_shards(source: str) -> Pool:
    try:
        from mmtune.data.shards import iter_records
    except ImportError:
        raise PoolError(f"{source}: reading shards needs mmtune.data.shards, which is not available") from None
    tmp = tempfile.mkdtemp(prefix="mmtune-select-images-")
    losses: list = []
    try:
        records = list(iter_records(source, extract_images_to=tmp, losses=losses))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pool = Pool(records, source, "shards", None, extracted_dir=tmp)
    lost = 0
    for loss in losses:
        lost += loss.lost if getattr(loss, "lost", None) is not None else 1
    if lost:
        pool.skipped["lost_in_shards"] = lost
        pool.notes.append(f"{lost} sample(s) could not be read from the shards (first: {losses[0].describe()})")
    return pool


def copy_selected_images(records: list[Record], pool: Pool, out: Path) -> list[Record]:
    """Shard pools: copy the subset's extracted images to OUT_images/ and point the records there."""
    if pool.kind != "shards" or not any(r.images for r in records):
        return records
    folder = out.with_name(out.stem + "_images")
    folder.mkdir(parents=True, exist_ok=True)
    moved = []
    for rec in records:
        paths = []
        for src in rec.images:
            dst = folder / Path(src).name
            shutil.copyfile(src, dst)
            paths.append(str(dst.resolve()))
        moved.append(Record(**{**rec.__dict__, "images": paths}))
    return moved
