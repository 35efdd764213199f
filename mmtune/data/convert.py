"""`mmtune convert`: published instruction / VQA files in, unified JSONL out.

Every input row ends up in exactly one place: the output (a validated
`Record` with absolute, decodable image paths) or the rejects file (its source
file, line or element index, a one-line reason and the raw row). Rows are
rejected for bad JSON, missing or mistyped fields, `<image>`/image count
mismatches, missing or undecodable images, empty assistant turns and duplicate
ids. Only a file that is not JSON/JSONL at all (or cannot be detected / paired)
stops the run, with a one-line `MMTuneError`.

Python API: `convert_files(paths, fmt="auto", image_root=None)` returns a
`ConvertResult`; the command line (`mmtune.cli.convert`) writes its records with
`write_records`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from mmtune.data.formats import (
    FORMATS,
    IMAGE_DIRS_KEY,
    Format,
    FormatError,
    InputFile,
    Paired,
    Row,
    RowError,
    detect_format,
    read_input,
    row_id,
    type_name,
)
from mmtune.data.images import check_image, is_url, resolve_image_path
from mmtune.data.schema import (
    Record,
    RecordError,
    RejectsWriter,
    validate_record,
)
from mmtune.data.tables import (
    TABLE_SUFFIXES,
    ImageFolder,
    bytes_extension,
    embedded_image,
    image_bytes_problem,
    is_table_source,
    printable,
    read_table,
)
from mmtune.errors import MMTuneError

INPUT_SUFFIXES = (".json", ".jsonl", *TABLE_SUFFIXES)


class ImageSink(Protocol):
    """Where embedded image bytes go: `put(bytes, embedded path)` -> the path the record will name."""

    def put(self, data: bytes, name: str | None) -> str: ...


@dataclass
class Reject:
    """One input row that did not become a record."""

    source: str  # the input file
    index: int | str | None  # JSONL: 1-based line; JSON array: 0-based element; GQA: question id
    reason: str  # one line, starting with the location


@dataclass
class ConvertResult:
    records: list[Record]
    rejects: list[Reject]
    formats: dict[str, str] = field(default_factory=dict)  # input file -> format used
    rows_per_input: dict[str, int] = field(default_factory=dict)
    input_rows: int = 0  # == len(records) + len(rejects)
    url_images: int = 0  # image references kept as URLs, not checked (offline)
    embedded_images: int = 0  # image files written from embedded bytes (parquet / arrow / datasets)
    rejects_path: Path | None = None

    @property
    def rejects_count(self) -> int:
        return len(self.rejects)

    @property
    def first_reject(self) -> str | None:
        return self.rejects[0].reason if self.rejects else None


def default_rejects_path(out: str | Path) -> Path:
    """OUT.jsonl -> OUT.rejects.jsonl (OUT.other -> OUT.other.rejects.jsonl)."""
    out = Path(out)
    if out.name.endswith(".jsonl"):
        return out.with_name(out.name[: -len(".jsonl")] + ".rejects.jsonl")
    return out.with_name(out.name + ".rejects.jsonl")


def default_images_dir(out: str | Path) -> Path:
    """OUT.jsonl -> OUT_images/ next to it: where embedded image bytes are written."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + "_images")


def default_id_prefixes(paths: Sequence[Path]) -> dict[str, str]:
    """The prefix of default record ids ("{prefix}-{row}") per input file, unique across the inputs.

    A file's name without its suffix (`train` for train.json), as before, when
    no other input has the same one; otherwise its path relative to the inputs'
    common folder (`en/train`, `zh/train`), so files of the same name in
    different folders never give clashing ids. The same inputs give the same ids.
    """
    def stem(p: Path) -> str:
        name = p.name
        for suffix in (".jsonl", ".json", ".parquet", ".arrow"):
            name = name.removesuffix(suffix)
        return name

    stems = [stem(p) for p in paths]
    if len(set(stems)) == len(stems):
        return {str(p): s for p, s in zip(paths, stems, strict=True)}
    absolute = [p.expanduser().absolute() for p in paths]
    common = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    return {str(p): (a.parent.relative_to(common) / stem(a)).as_posix() for p, a in zip(paths, absolute, strict=True)}


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """The input files: files as given, folders expanded to their *.json / *.jsonl (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and is_table_source(p):  # a `datasets.save_to_disk` folder is one input
            out.append(p)
        elif p.is_dir():
            found = sorted(c for c in p.iterdir() if c.is_file() and c.name.endswith(INPUT_SUFFIXES))
            if not found:
                raise MMTuneError(f"{p}: folder has no .json, .jsonl, .parquet or .arrow files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise MMTuneError(f"{p}: no such file or folder")
    if not out:
        raise MMTuneError("no input files given")
    return out


class _Converter:
    """Turns rows into records or rejects; holds what spans files (ids seen, image checks)."""

    def __init__(self, *, source: str | None, task: str | None, writer: RejectsWriter, progress: bool | None,
                 images: ImageSink | None = None) -> None:
        self.source = source
        self.sink = images
        self.task = task
        self.writer = writer
        self.progress = progress
        self.records: list[Record] = []
        self.rejects: list[Reject] = []
        self.seen: dict[str, str] = {}  # id -> location of its first record
        self.image_checks: dict[str, str | None] = {}  # path -> reason (None = fine)
        self.url_images = 0
        self.rows = 0
        self.last_embedded: set[int] = set()  # indices of the last converted row's images that were embedded

    def reject(self, row: Row, reason: str) -> None:
        self.rejects.append(Reject(row.source, row.index, reason))
        self.writer.add(reason, source=row.source, index=row.index, raw=printable(row.data))

    def run(self, rows: Iterable[Row], fmt: Format, stem: str, image_root: Path, desc: str,
            id_prefix: str | None = None) -> None:
        total = len(rows) if hasattr(rows, "__len__") else getattr(rows, "total", None)
        bar = tqdm(rows, desc=desc, unit=" rows", leave=False, total=total,
                   disable=None if self.progress is None else not self.progress)
        for row in bar:
            self.rows += 1
            try:
                record = self.convert_row(row, fmt, stem, image_root, id_prefix)
            except RecordError as exc:
                self.reject(row, exc.describe())
                continue
            self.seen[record.id] = row.location
            self.records.append(record)

    def convert_row(self, row: Row, fmt: Format, stem: str, image_root: Path, id_prefix: str | None = None) -> Record:
        def fail(reason: str, fld: str | None = None, rid: str | None = None) -> RecordError:
            return RecordError(reason, record_id=rid, field=fld, path=row.location)

        if row.error is not None:
            raise fail(row.error)
        data = row.data
        if not isinstance(data, dict):
            raise fail(f"expected a JSON object, got {type_name(data)}")
        default_id = f"{id_prefix or stem}-{row.position}"
        try:
            mapped = fmt.map_row(data)
        except RowError as exc:
            raise fail(exc.reason, exc.field, exc.record_id or _safe_id(data) or default_id) from None
        if mapped.get("id") is None and fmt.assigns_ids:
            mapped["id"] = default_id
        image_dirs: list[str] = mapped.pop(IMAGE_DIRS_KEY, [])
        embedded = self.take_embedded(mapped, fail, rid=mapped.get("id"))
        self.last_embedded = set(embedded)
        if mapped.get("meta"):
            mapped["meta"] = printable(mapped["meta"])  # a binary column of a table stays out of the JSON
        mapped["source"] = self.source or mapped.get("source") or stem
        if self.task:
            mapped["task"] = self.task
        record = validate_record(mapped, path=row.location)
        if record.id in self.seen:
            raise fail(f"duplicate id (first at {self.seen[record.id]})", "id", record.id)

        resolved = []
        for i, name in enumerate(record.images):
            if i in embedded:  # written only now, once the row is known to become a record
                data, original = embedded[i]
                problem = image_bytes_problem(data)
                if problem is not None:
                    raise fail(problem, f"images[{i}]", record.id)
                if self.sink is None:
                    raise MMTuneError("this input embeds image bytes: give a folder to write them to "
                                      "(--images-dir, or images_dir= in the Python API)")
                resolved.append(self.sink.put(data, original))
                continue
            if is_url(name):
                resolved.append(name)
                continue
            path, reason = self.find_image(name, image_root, image_dirs)
            if reason is not None:
                raise fail(reason, f"images[{i}]", record.id)
            resolved.append(path)
        self.url_images += sum(map(is_url, resolved))
        record.images = resolved
        return record

    def take_embedded(self, mapped: dict[str, Any], fail: Any, rid: Any) -> dict[int, tuple[bytes, str | None]]:
        """Embedded `{"bytes", "path"}` images of `mapped["images"]`, by index, each replaced by a stand-in
        name for validation; a struct without bytes names a file by its path, resolved like any other."""
        images = mapped.get("images")
        if not isinstance(images, list):
            return {}
        rid = str(rid) if isinstance(rid, str | int) and not isinstance(rid, bool) else None
        taken: dict[int, tuple[bytes, str | None]] = {}
        for i, value in enumerate(images):
            found = embedded_image(value)
            if found is None:
                continue
            data, name = found
            if data is None:
                if not name:
                    raise fail("embedded image has neither bytes nor a path", f"images[{i}]", rid)
                images[i] = name
                continue
            taken[i] = (data, name)
            images[i] = name or f"embedded-{i}"
        return taken

    def find_image(self, name: str, root: Path, subdirs: Sequence[str]) -> tuple[str, str | None]:
        """Resolve against the image root (then its `subdirs`, e.g. VQA's val2014/) and check it."""
        candidates = [resolve_image_path(name, root)]
        if not Path(name).expanduser().is_absolute():
            candidates += [resolve_image_path(name, root / d) for d in subdirs]
        path = next((c for c in candidates if Path(c).exists()), candidates[0])
        if path not in self.image_checks:
            self.image_checks[path] = check_image(path)
        reason = self.image_checks[path]
        if reason is not None and len(candidates) > 1 and not Path(path).exists():
            reason += f" (also looked in {', '.join(str(root / d) for d in subdirs)})"
        return path, reason


def _safe_id(data: dict[str, Any]) -> str | None:
    try:
        return row_id(data) or row_id(data, "question_id")
    except RowError:
        return None


def _resolve_format(inp: InputFile, fmt: str) -> str:
    if fmt == "auto":
        return detect_format(inp)
    if fmt not in FORMATS:
        raise MMTuneError(f"unknown format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    FORMATS[fmt].check(inp)
    return fmt


def convert_files(
    paths: Iterable[str | Path],
    fmt: str = "auto",
    image_root: str | Path | None = None,
    *,
    source: str | None = None,
    task: str | None = None,
    rejects_path: str | Path | None = None,
    progress: bool | None = None,
    images_dir: str | Path | ImageSink | None = None,
) -> ConvertResult:
    """Import files (or folders of them) into unified records.

    `fmt` is "auto" (detected per file from its keys) or a name in `FORMATS`.
    Relative image paths resolve against `image_root`, default each input
    file's folder. `source` / `task` override every record's. Rejects go to
    `rejects_path` (JSONL, overwritten; nothing written when there are none)
    and to `ConvertResult.rejects`. `progress=None` shows bars on a terminal only.
    Parquet / Arrow files and `save_to_disk` folders are read with `datasets`
    (`mmtune.data.tables`); images they embed as bytes are written unchanged
    into `images_dir` (a folder, or any `ImageSink`) and the records name those files.
    """
    files = expand_inputs(paths)
    rejects_file = Path(rejects_path) if rejects_path else None
    inputs = [read_table(p) if is_table_source(p) else read_input(p) for p in files]
    formats = {str(inp.path): _resolve_format(inp, fmt) for inp in inputs}

    # Each format sees all its input files at once: one published as several files joins them here.
    by_format: dict[str, list[InputFile]] = {}
    for inp in inputs:
        by_format.setdefault(formats[str(inp.path)], []).append(inp)
    paired: dict[str, Paired] = {name: FORMATS[name].pair(group) for name, group in by_format.items()}

    prefixes = default_id_prefixes([inp.path for inp in inputs])
    result = ConvertResult(records=[], rejects=[], formats=formats, rejects_path=rejects_file)
    with RejectsWriter(rejects_file) as writer:
        sink = ImageFolder(images_dir) if isinstance(images_dir, str | Path) else images_dir
        conv = _Converter(source=source, task=task, writer=writer, progress=progress, images=sink)
        for inp in inputs:
            name = formats[str(inp.path)]
            rows = paired[name].rows.get(str(inp.path))
            if rows is None:  # joined into another input of its format
                continue
            root = Path(image_root) if image_root is not None else inp.path.parent
            before = conv.rows
            conv.run(rows, FORMATS[name], inp.stem, root.expanduser().absolute(), desc=inp.path.name,
                     id_prefix=prefixes[str(inp.path)])
            result.rows_per_input[str(inp.path)] = conv.rows - before
        for row in (row for pairing in paired.values() for row in pairing.leftovers):
            conv.rows += 1
            conv.reject(row, f"{row.location}: {row.error}")
            result.rows_per_input[row.source] = result.rows_per_input.get(row.source, 0) + 1
    result.records, result.rejects = conv.records, conv.rejects
    result.input_rows, result.url_images = conv.rows, conv.url_images
    result.embedded_images = getattr(sink, "written", 0)
    if rejects_file is not None and not result.rejects:
        rejects_file.unlink(missing_ok=True)
    return result


class _RowBytes:
    """An ImageSink that keeps one row's embedded bytes in memory (for `mmtune shard`, which stores them
    in the tar sample) and names each by its embedded path, or by its content when it has none."""

    def __init__(self) -> None:
        self.blobs: list[bytes] = []

    def put(self, data: bytes, name: str | None) -> str:
        self.blobs.append(data)
        return name or f"{hashlib.sha256(data).hexdigest()[:20]}.{bytes_extension(data, None)}"


@dataclass
class TableItem:
    """One row of a table input for `mmtune shard`: a record and its images' bytes, or why it was rejected."""

    row: Row
    record: Record | None
    image_bytes: list[bytes] = field(default_factory=list)  # in `record.images` order
    error: RecordError | None = None


def iter_table_records(
    path: str | Path, fmt: str = "auto", image_root: str | Path | None = None, *, seen: dict[str, str] | None = None,
    id_prefix: str | None = None,
) -> Iterator[TableItem]:
    """The rows of a parquet / arrow / datasets input as records with their image bytes, one row at a time.

    Embedded images keep their bytes (never decoded into pixels and re-encoded);
    images named by path are read from disk. Ids repeated within or across
    inputs sharing `seen` come back as errors, like every other unusable row.
    """
    inp = read_table(path)
    name = _resolve_format(inp, fmt)
    if FORMATS[name].container:
        raise FormatError(f"{path}: {name} is a whole-file JSON layout, not a table")
    sink = _RowBytes()
    conv = _Converter(source=None, task=None, writer=RejectsWriter(None), progress=False, images=sink)
    if seen is not None:
        conv.seen = seen
    root = (Path(image_root) if image_root is not None else inp.path.parent).expanduser().absolute()
    for row in inp.rows:
        sink.blobs = []
        try:
            record = conv.convert_row(row, FORMATS[name], inp.stem, root, id_prefix)
        except RecordError as exc:
            yield TableItem(row, None, error=exc)
            continue
        urls = [i for i, p in enumerate(record.images) if i not in conv.last_embedded and is_url(p)]
        if urls:
            yield TableItem(row, None, error=RecordError(
                f"{record.images[urls[0]]} is a URL; download it first (mmtune never downloads)",
                record_id=record.id, field=f"images[{urls[0]}]", path=row.location))
            continue
        conv.seen[record.id] = row.location
        blobs = iter(sink.blobs)
        data = [next(blobs) if i in conv.last_embedded else Path(p).read_bytes() for i, p in enumerate(record.images)]
        yield TableItem(row, record, data)
