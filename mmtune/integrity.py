"""Is a saved checkpoint whole? A cheap check of every file, before anything is loaded from it.

`find_corruption(folder)` reads only what it takes to tell a complete file
from a truncated or garbled one, so it is fast on a 7B checkpoint:

- `*.safetensors`: the 8-byte header length, the JSON header, and the file
  size the header's tensor offsets imply (a truncated copy is shorter);
- `*.json` / `*.yaml`: parsed whole (they are small: configs, tokenizer, state);
- `*.pt` / `*.bin`: torch's zip container must have its central directory,
  which sits at the end of the file and is the first thing a truncation loses;
- `sharded/` (an FSDP checkpoint): its `.metadata`, unpickled with an
  allowlist (mmtune.dcp_metadata), and every shard file as long as the byte
  ranges that metadata gives it.

It returns the first broken file and why, or None. `intact_before(folder)` is
the newest earlier `checkpoint-STEP` sibling that passes the same check, so a
message can point at what is still usable. Imports only mmtune.dcp_metadata.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from pathlib import Path

from mmtune.dcp_metadata import METADATA_FILE, storage_problem

_STEP_RE = re.compile(r"^checkpoint-(\d+)$")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes, no header)"
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            return f"truncated or not safetensors (header of {n} bytes in a {size}-byte file)"
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "corrupt safetensors header"
    if not isinstance(header, dict):
        return "corrupt safetensors header"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            return f"corrupt safetensors header (tensor {name!r})"
    if 8 + n + end > size:
        return f"truncated ({size} bytes; its header needs {8 + n + end})"
    return None


def _file_problem(path: Path) -> str | None:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return _safetensors_problem(path)
        if suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix in (".yaml", ".yml"):
            import yaml

            yaml.safe_load(path.read_text(encoding="utf-8"))
        elif suffix in (".pt", ".bin"):
            with zipfile.ZipFile(path):
                pass
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"corrupt ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    except zipfile.BadZipFile:
        return "truncated or corrupt (not a complete torch file)"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except Exception as exc:  # yaml's errors: a garbled config
        return f"corrupt ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def find_corruption(folder: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """(file, reason) for the first broken file of a checkpoint folder, or None when all are whole."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            problem = _file_problem(path)
            if problem is not None:
                return path, problem
    for metadata in sorted(Path(folder).rglob(METADATA_FILE)):  # the sharded folders of an FSDP checkpoint
        found = storage_problem(metadata.parent)
        if found is not None:
            return found
    return None


def intact_before(folder: str | os.PathLike[str]) -> Path | None:
    """The newest `checkpoint-STEP` next to `folder` with a lower step that passes `find_corruption`."""
    folder = Path(folder)
    m = _STEP_RE.match(folder.name)
    if m is None or not folder.parent.is_dir():
        return None
    step = int(m.group(1))
    earlier = []
    for child in folder.parent.iterdir():
        cm = _STEP_RE.match(child.name)
        if cm and child.is_dir() and int(cm.group(1)) < step:
            earlier.append((int(cm.group(1)), child))
    for _, child in sorted(earlier, reverse=True):
        if find_corruption(child) is None:
            return child
    return None


def corruption_message(folder: str | os.PathLike[str], file: Path, reason: str) -> str:
    """One line: which file of which checkpoint is broken, and which earlier one is intact."""
    folder = Path(folder)
    earlier = intact_before(folder)
    where = f"{file.relative_to(folder).as_posix()} of checkpoint {folder} is {reason}"
    if earlier is not None:
        return f"{where}; the earlier checkpoint {earlier} is intact (use it, or --resume-from latest falls back to it)"
    return f"{where}; no earlier intact checkpoint in {folder.parent}"
