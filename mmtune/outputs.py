"""The one rule for every path an mmtune command writes (imports nothing else from mmtune but `errors`).

Every command (convert, select, shard, train, eval, export, generate, demo)
lists what it reads and what it writes, and calls `check_outputs` before any
work starts. The contract, each violation a one-line `OutputPathError` naming
the flag and the path:

- an output is never one of the inputs (`--rejects pool.jsonl`), compared by
  resolved path and, where both exist, by file identity (hard links, symlinks);
- no two outputs of one command are the same path (`--rejects` = `--out`);
- an output is never a run / checkpoint folder the command reads, nor inside
  one, nor a folder that holds one (`export RUN --out RUN`);
- an output folder that is replaced as a whole (`--overwrite`) holds no input;
- a file output is not an existing folder, and a folder output is not an
  existing file.

Writing itself goes through `mmtune.fileio` (temporary file or folder, then a
rename), so no existing output is removed before its replacement is complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mmtune.errors import MMTuneError

PathLike = str | os.PathLike[str]


class OutputPathError(MMTuneError):
    """An output path that breaks the rule above (one line)."""


@dataclass(frozen=True)
class Out:
    """One path a command writes.

    `flag` is how the user named it (`--out`, `--rejects`, `train.output_dir`);
    `kind` is "file" or "folder"; `whole` marks a folder replaced as a whole
    (`--overwrite` of export / demo / train), which therefore may hold no input.
    """

    path: Path
    flag: str
    kind: str = "file"
    whole: bool = False


def out(path: PathLike | None, flag: str, kind: str = "file", *, whole: bool = False) -> Out | None:
    """An `Out`, or None when the path is not given (so callers can pass optional flags as they are)."""
    if path is None or str(path) == "":
        return None
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    return Out(Path(path), flag, kind, whole)


def _abs(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser())).resolve()


def _same(a: Path, b: Path) -> bool:
    if _abs(a) == _abs(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    c, p = _abs(child), _abs(parent)
    return c != p and p in c.parents


def check_outputs(
    outputs: Iterable[Out | None],
    *,
    inputs: Iterable[tuple[str, PathLike]] = (),
    runs: Iterable[tuple[str, PathLike]] = (),
) -> None:
    """Refuse (one line) any output that would destroy an input, another output or an input run.

    `inputs`: (what, path) pairs of files or folders the command reads.
    `runs`: (what, path) pairs of run / checkpoint folders it reads (export's
    source, eval's models, a projector checkpoint).
    """
    outs = [o for o in outputs if o is not None]
    ins = [(what, Path(p)) for what, p in inputs if p is not None and "{" not in str(p) and "://" not in str(p)]
    run_list = [(what, Path(p)) for what, p in runs if p is not None]
    for o in outs:
        if o.kind == "file" and o.path.is_dir():
            raise OutputPathError(f"{o.flag} {o.path}: is an existing folder; give a file path")
        if o.kind == "folder" and o.path.exists() and not o.path.is_dir():
            raise OutputPathError(f"{o.flag} {o.path}: is an existing file; give a folder path")
        for what, p in ins:
            if _same(o.path, p):
                raise OutputPathError(f"{o.flag} {o.path}: is also an input ({what}); choose another path")
            if o.kind == "folder" and o.whole and _inside(p, o.path):
                raise OutputPathError(
                    f"{o.flag} {o.path}: holds the input {p} ({what}) and would be replaced as a whole; "
                    "choose another path")
        for what, r in run_list:
            if _same(o.path, r) or _inside(o.path, r):
                raise OutputPathError(f"{o.flag} {o.path}: is inside the {what} {r} it reads; write somewhere else")
            if _inside(r, o.path):
                raise OutputPathError(f"{o.flag} {o.path}: holds the {what} {r} it reads; write somewhere else")
    for i, a in enumerate(outs):
        for b in outs[i + 1:]:
            if _same(a.path, b.path):
                raise OutputPathError(
                    f"{a.flag} and {b.flag} are the same path {a.path}; one would overwrite the other")
