"""Small file helpers every layer shares (imports nothing else from mmtune).

`write_json_atomic` is the one way mmtune writes a JSON file (reports,
selection summaries, trainer state): a temporary file in the same folder,
then a rename, so a reader never sees half a file. `atomic_text` does the same
for any text file written line by line (JSONL outputs, rejects), removes its
temporary file when the write fails, and never crashes on a lone surrogate in
a string (it is written as the JSON escape `\\udXXX`). `replace_dir` swaps a
finished temporary folder in for an existing one, so nothing is removed before
its replacement is complete.
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


def write_json_atomic(obj: Any, path: str | os.PathLike[str], *, fsync: bool = False, sort_keys: bool = False) -> Path:
    """Write `obj` as indented JSON to `path` atomically; `fsync` also flushes it to disk (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", errors=TEXT_ERRORS) as fh:
            json.dump(obj, fh, indent=2, ensure_ascii=False, sort_keys=sort_keys, default=_json_default)
            fh.write("\n")
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def temp_sibling(path: str | os.PathLike[str], tag: str = "tmp") -> Path:
    """A hidden name next to `path` for its temporary copy: DIR/.NAME.TAG-PID."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


@contextlib.contextmanager
def atomic_text(path: str | os.PathLike[str]) -> Iterator[IO[str]]:
    """Write a text file as temp file -> rename; on any error the temp file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8", errors=TEXT_ERRORS) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(tmp: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Put the finished folder `tmp` at `out`; an existing `out` is moved aside first and deleted last."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = temp_sibling(out, "old")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)  # put the previous one back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
