"""Read a torch.distributed.checkpoint folder's `.metadata` without running code from it.

An FSDP checkpoint's `sharded/` folder (mmtune.train.sharding writes it with
torch.distributed.checkpoint, "DCP") holds one `__R_0.distcp` file of tensor
bytes per process and one `.metadata` file, which DCP writes and reads with
plain `pickle`. Unpickling runs whatever the file names, so a checkpoint from
someone else could run code on `mmtune consolidate`, `export`, `generate` or a
resume. The standard here is "safetensors or `torch.load(weights_only=True)`";
DCP has no such mode for its metadata, so this module supplies one.

Contract:
- `read_metadata(folder)` unpickles `folder/.metadata` allowing only the
  classes DCP's metadata is made of (its `metadata` dataclasses and enum,
  `filesystem._StorageInfo`, `torch.Size`, torch dtypes and layouts, pathlib
  paths). Any other global is refused with `UnsafeCheckpointError` naming the
  file and the global, before anything is called.
- `safe_file_system_reader(folder)` reads the metadata that way at once
  (so a refusal is raised as itself, not wrapped in DCP's errors) and returns
  DCP's own `FileSystemReader` serving it; pass it as `storage_reader=` to
  `dcp.load`. (The tensors in `.distcp` files DCP already reads with
  `torch.load(weights_only=True)`.)
- `storage_problem(folder)` is None when every file and byte range the
  metadata names exists, else why not (a truncated or missing shard file,
  a garbled `.metadata`): mmtune.integrity uses it.

Hand-written because DCP offers no restricted reader (torch 2.14). Imports
only mmtune.errors from mmtune.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from mmtune.errors import MMTuneError

METADATA_FILE = ".metadata"
_DCP = "torch.distributed.checkpoint"
# (module, name) pairs a DCP .metadata may name, besides every class of DCP's `metadata` module and
# torch's dtypes. Exact names: pickle also accepts dotted ones such as "Path.touch", which are refused.
_ALLOWED = {
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *(("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")),
}


class UnsafeCheckpointError(MMTuneError, pickle.UnpicklingError):
    """A `.metadata` names something other than DCP's own metadata classes (a one-line error)."""

    def __init__(self, path: Path, global_name: str) -> None:
        self.global_name = global_name
        super().__init__(
            f"{path}: refusing to unpickle {global_name}; a sharded checkpoint's {METADATA_FILE} holds only "
            "torch.distributed.checkpoint's own metadata classes (was this checkpoint made by mmtune?)")


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, fh: Any, path: Path) -> None:
        super().__init__(fh)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or self._dcp_class(module, name) or self._dtype(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(self.path, f"{module}.{name}")

    @staticmethod
    def _dcp_class(module: str, name: str) -> bool:
        if module != f"{_DCP}.metadata" or "." in name:
            return False
        import torch.distributed.checkpoint.metadata as meta

        return isinstance(getattr(meta, name, None), type)

    @staticmethod
    def _dtype(module: str, name: str) -> bool:
        if module != "torch" or "." in name:
            return False
        import torch

        return isinstance(getattr(torch, name, None), torch.dtype)


def read_metadata(folder: str | os.PathLike[str]) -> Any:
    """DCP's `Metadata` from `folder/.metadata`, unpickled with the allowlist above."""
    path = Path(folder) / METADATA_FILE
    with open(path, "rb") as fh:
        return _MetadataUnpickler(fh, path).load()


def safe_file_system_reader(folder: str | os.PathLike[str]) -> Any:
    """A `torch.distributed.checkpoint.FileSystemReader` for `folder` serving the metadata `read_metadata`
    read (now: a refused or broken `.metadata` raises here, before `dcp.load` and its error wrapping)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    metadata = read_metadata(folder)
    if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
        metadata.storage_meta = StorageMeta()

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            # DCP asks for per-rank metadata files only after the global one failed: not a layout mmtune writes
            if kwargs.get("rank") is not None:
                raise FileNotFoundError(f"{folder}: per-rank metadata files are not read")
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(folder)


def storage_problem(folder: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """(file, reason) for the first shard file that is missing or shorter than the metadata says, or None.

    Reads the metadata (allowlisted) and the files' sizes only, so it is cheap on a 7B checkpoint.
    """
    folder = Path(folder)
    meta_path = folder / METADATA_FILE
    try:
        metadata = read_metadata(folder)
        ends: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), int(info.offset) + int(info.length))
    except UnsafeCheckpointError as exc:
        return meta_path, f"refused (refusing to unpickle {exc.global_name})"
    except OSError as exc:
        return meta_path, f"unreadable ({exc.strerror or exc})"
    except Exception as exc:  # noqa: BLE001 - a truncated or garbled pickle raises several kinds
        return meta_path, f"corrupt ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    for name in sorted(ends):
        path = folder / name
        if not path.is_file():
            return path, "missing (the sharded metadata names it)"
        size = path.stat().st_size
        if size < ends[name]:
            return path, f"truncated ({size} bytes; the sharded metadata expects at least {ends[name]})"
    return None
