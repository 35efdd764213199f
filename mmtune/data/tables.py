"""Parquet, Arrow and `datasets.save_to_disk` inputs, read with the `datasets` library, offline.

Most public instruction and caption sets (LLaVA mixes, LLaMA-Factory's
`llava-en-zh`, TRL's `llava-instruct-mix`) are published as parquet or as
Hugging Face `datasets` folders, with images embedded as
`{"bytes": ..., "path": ...}` structs. This module turns such a table into the
same `Row`s the JSON readers give, so `mmtune convert` maps its columns with the
existing importers (conversations / messages / instruction-input-output):

- `is_table_source(path)`: a `.parquet` / `.arrow` file, or a folder written by
  `Dataset.save_to_disk` (`state.json`) or `DatasetDict.save_to_disk`
  (`dataset_dict.json`, every split read in turn).
- `read_table(path)`: an `InputFile` whose rows are read lazily (one row at a
  time; a table of embedded images never sits in memory whole). Row `index`
  is the 0-based row number; a split of a DatasetDict is named in `source`.
- Images stay bytes: `datasets`' Image feature decoding is switched off, and
  `embedded_image` recognises the `{"bytes", "path"}` struct. `ImageFolder`
  writes such bytes unchanged to a content-addressed file (the same image
  shared by many rows is written once) and never decodes or re-encodes them.

Nothing here reaches the network: `HF_DATASETS_OFFLINE` is set before
`datasets` is imported, and only local paths are accepted.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mmtune.data.formats import FormatError, InputFile, Row
from mmtune.errors import MMTuneError
from mmtune.fileio import write_bytes_atomic

TABLE_SUFFIXES = (".parquet", ".arrow")
DATASET_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}


def is_table_source(path: str | os.PathLike[str]) -> bool:
    """True for a .parquet / .arrow file or a `save_to_disk` folder."""
    p = Path(path)
    if p.is_dir():
        return any((p / m).is_file() for m in DATASET_MARKERS)
    return p.name.lower().endswith(TABLE_SUFFIXES)


def _datasets() -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:  # a declared dependency, but say what to do if it is missing
        raise MMTuneError("reading parquet / arrow / datasets folders needs the `datasets` package: "
                          "pip install datasets") from None
    return datasets


def _splits(path: Path) -> list[tuple[str | None, Any]]:
    """(split name or None, IterableDataset with image decoding off) for each part of the input."""
    ds_lib = _datasets()
    name = str(path)
    try:
        if path.is_dir():
            loaded = ds_lib.load_from_disk(str(path))
            parts = list(loaded.items()) if isinstance(loaded, ds_lib.DatasetDict) else [(None, loaded)]
            return [(split, d.to_iterable_dataset().decode(False)) for split, d in parts]
        builder = "parquet" if path.name.lower().endswith(".parquet") else "arrow"
        # streaming: rows are read from the file as they are needed, nothing is copied to a cache
        it = ds_lib.load_dataset(builder, data_files=str(path), split="train", streaming=True)
        return [(None, it.decode(False))]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise FormatError(f"{name}: cannot read as {'a datasets folder' if path.is_dir() else path.suffix[1:]} "
                          f"({type(exc).__name__}: {detail})") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow / datasets raise their own types for a corrupt file
        detail = " ".join(str(exc).split())[:300]
        raise FormatError(f"{name}: cannot read ({type(exc).__name__}: {detail})") from None


class TableRows:
    """The rows of a table input, read lazily each time they are iterated."""

    def __init__(self, path: Path, parts: list[tuple[str | None, Any]]) -> None:
        self.path, self.parts = path, parts

    def __iter__(self) -> Iterator[Row]:
        name = str(self.path)
        position = 0
        for split, ds in self.parts:
            source = name if split is None else f"{name}[{split}]"
            try:
                for n, data in enumerate(ds):
                    yield Row(source, n, f"{source} row {n}", position, data=data)
                    position += 1
            except Exception as exc:  # noqa: BLE001 - a file that breaks mid-way is one error naming it
                detail = " ".join(str(exc).split())[:300]
                raise FormatError(f"{source}: unreadable after row {position} ({type(exc).__name__}: {detail})") from None

    @property
    def total(self) -> int | None:
        """The row count when the files say it without reading rows (for the progress bar)."""
        try:
            if self.path.is_dir():
                return sum(int(ds.info.splits.total_num_examples) if ds.info.splits else 0 for _, ds in self.parts) or None
            if self.path.name.lower().endswith(".parquet"):
                import pyarrow.parquet as pq

                return int(pq.read_metadata(self.path).num_rows)
        except Exception:  # noqa: BLE001 - only a progress-bar total
            return None
        return None

    def head(self, n: int) -> list[Row]:
        return list(itertools.islice(self, n))


def read_table(path: str | os.PathLike[str]) -> InputFile:
    """A parquet / arrow file or `save_to_disk` folder as an `InputFile` (layout "table") of lazy rows."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder")
    return InputFile(path, "table", rows=TableRows(path, _splits(path)))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- #
# Embedded images
# --------------------------------------------------------------------------- #


def embedded_image(value: Any) -> tuple[bytes | None, str | None] | None:
    """(bytes, path) of a `datasets` Image struct `{"bytes", "path"}`, or None when `value` is not one."""
    if not isinstance(value, dict) or not set(value) <= {"bytes", "path"} or "bytes" not in value:
        return None
    data, name = value.get("bytes"), value.get("path")
    if data is not None and not isinstance(data, bytes | bytearray | memoryview):
        return None
    if name is not None and not isinstance(name, str):
        return None
    return (bytes(data) if data is not None else None), name


def image_bytes_problem(data: bytes) -> str | None:
    """Why these image bytes are unusable (PIL verify + full decode, as `check_image` does), or None."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"embedded image bytes cannot be decoded ({' '.join(str(exc).split()) or type(exc).__name__})"
    return None


def bytes_extension(data: bytes, name: str | None = None) -> str:
    """The file extension for image bytes: the embedded path's own, else the format PIL reads from the header."""
    if name:
        ext = Path(name).suffix.lower().lstrip(".")
        if re.fullmatch(r"[a-z0-9]{1,5}", ext):
            return ext
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
    except (UnidentifiedImageError, OSError):
        return "img"
    return _PIL_EXT.get(fmt, re.sub(r"[^a-z0-9]", "", fmt.lower())[:5] or "img")


class ImageFolder:
    """Writes embedded image bytes, unchanged, to `folder/SHA256[:20].EXT`.

    Content-addressed names (our own choice, not a library's): LLaVA-style sets
    embed the same image in many rows, and a name from the bytes writes it once,
    makes a re-run give the same paths, and never lets two images collide.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.written = 0

    def put(self, data: bytes, name: str | None) -> str:
        target = self.folder / f"{hashlib.sha256(data).hexdigest()[:20]}.{bytes_extension(data, name)}"
        if target.exists():
            if target.read_bytes() != data:
                raise MMTuneError(f"{target}: exists with other content; choose another --images-dir")
            return str(target.absolute())
        write_bytes_atomic(data, target)
        self.written += 1
        return str(target.absolute())


def printable(value: Any) -> Any:
    """A row with its bytes replaced by "<N bytes>", for the rejects file."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable(v) for v in value]
    return value
