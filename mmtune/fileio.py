"""Small file helpers every layer shares (imports nothing else from mmtune).

Every file mmtune writes for a user is written whole or not at all: into a
temporary sibling first, then renamed over the target, so a reader (or a
crash, or an error half-way) never leaves half a file, and a failing write
leaves the previous file as it was. The one mechanism is `atomic_path`; the
rest are its shapes:

- `atomic_path(path)`: a temporary path to hand any writer (np.save,
  matplotlib, openpyxl, yaml); it keeps `path`'s suffix, because such writers
  choose their format by it.
- `atomic_text(path)`: a text handle (JSONL outputs, rejects, tables); never
  crashes on a lone surrogate in a string (written as the JSON escape `\\udXXX`).
- `write_json_atomic`, `write_bytes_atomic`, `write_png`: one call each.
- `atomic_dir(out)` / `replace_dir(tmp, out)`: the same for a folder (exports,
  best/, consolidated checkpoints); an existing `out` is moved aside and
  deleted only once its replacement is in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# Lone surrogates (from "\ud83d" escapes) cannot be encoded as UTF-8; backslashreplace
# writes them as "\udXXX", which inside a JSON string is the escape they came from.
TEXT_ERRORS = "backslashreplace"


def _json_default(o: Any) -> Any:
    """numpy scalars/arrays as plain numbers/lists; anything else as its str()."""
    if hasattr(o, "tolist") and callable(o.tolist):
        return o.tolist()
    return str(o)


def temp_sibling(path: str | os.PathLike[str], tag: str = "tmp") -> Path:
    """A hidden name next to `path` for its temporary copy: DIR/.NAME.TAG-PID."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed to `path` when the block ends without error.

    On any error the temporary file is removed and `path` is untouched. The
    temporary name ends in `path`'s suffix (DIR/.NAME.tmp-PID.SUFFIX). `fsync`
    flushes the file to disk before the rename (checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp = tmp.with_name(tmp.name + path.suffix)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_text(path: str | os.PathLike[str], *, newline: str | None = None, fsync: bool = False) -> Iterator[IO[str]]:
    """Write a text file (UTF-8) as temp file -> rename; on any error `path` is untouched."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "w", encoding="utf-8", errors=TEXT_ERRORS,
                                                      newline=newline) as fh:
        yield fh


def write_json_atomic(obj: Any, path: str | os.PathLike[str], *, fsync: bool = False, sort_keys: bool = False) -> Path:
    """Write `obj` as indented JSON to `path` atomically; `fsync` also flushes it to disk (checkpoints)."""
    with atomic_text(path, fsync=fsync) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, sort_keys=sort_keys, default=_json_default)
        fh.write("\n")
    return Path(path)


def write_bytes_atomic(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_png(fig: Any, path: str | os.PathLike[str], **savefig: Any) -> Path:
    """Save a matplotlib figure as PNG atomically (`savefig` keywords: dpi, bbox_inches, ...).

    The figure is not closed: the caller owns it.
    """
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig)
    return Path(path)


def replace_dir(tmp: str | os.PathLike[str], out: str | os.PathLike[str], *, aside: Path | None = None) -> None:
    """Put the finished folder `tmp` at `out`; an existing `out` is moved aside first and deleted last.

    `aside` names where the previous `out` waits (default DIR/.NAME.old-PID); a
    caller that repairs crashed swaps (checkpoints) passes the name it looks for.
    """
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = aside if aside is not None else temp_sibling(out, "old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)  # put the previous one back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fresh_dir(path: str | os.PathLike[str]) -> Path:
    """`path` as a new, empty folder: what a crashed earlier write left there is removed first."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh, empty temporary folder beside `out` to fill; it becomes `out` when the block ends without error.

    On any error the temporary folder is removed and `out` is untouched; an
    existing `out` is replaced only once the new one is complete (`replace_dir`).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_dir(temp_sibling(out))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
