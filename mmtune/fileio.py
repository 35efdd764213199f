"""Small file helpers every layer shares (imports nothing else from mmtune).

`write_json_atomic` is the one way mmtune writes a JSON file (reports,
selection summaries, trainer state): a temporary file in the same folder,
then a rename, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, sort_keys=sort_keys, default=_json_default)
        fh.write("\n")
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
