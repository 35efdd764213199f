"""Checkpoint folders on disk: atomic writes, rotation, `latest`, RNG and optimizer state.

A checkpoint is `OUT/checkpoint-STEP/`. It is written as `OUT/.tmp-checkpoint-STEP/`
and renamed only once every file is in place, so a crash (or `kill -9`) in the
middle of a save leaves the previous checkpoints untouched and at worst a
`.tmp-*` folder that the next run removes. A folder counts as a checkpoint only
when it holds `trainer_state.json`, the last file written before the rename.
`OUT/best/` (train.save_best) is written the same way through `OUT/.tmp-best/`,
and `remove_stale_temps` clears what a crash left of either kind of save. With
several processes the trainer drives both through `mmtune.train.handshake`.

This module knows nothing about models; the trainer hands it callables that
write the model files (through `mmtune.model.io`). Optimizer, scheduler and RNG
states are `torch.save`d dicts of tensors and plain Python values and are read
back with `torch.load(weights_only=True)`, which refuses arbitrary pickles.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtune import runs
from mmtune.fileio import fresh_dir, replace_dir, write_json_atomic
from mmtune.integrity import corruption_message, find_corruption

# The layout and what counts as a complete checkpoint belong to mmtune.runs (the
# finders are imported here because resume, rotation and the tests reach them as ckpt.NAME).
from mmtune.runs import (
    OLD_PREFIX,
    STATE_FILE,
    CheckpointError,
    checkpoint_path,
    is_training_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    old_checkpoint_path,
    resolve_checkpoint,
    rng_file,
    temp_checkpoint_path,
)

__all__ = [
    "CheckpointError", "begin_checkpoint", "capture_rng_state", "commit_checkpoint", "latest_checkpoint",
    "list_checkpoints", "load_state_file", "read_trainer_state", "remove_stale_temps", "resolve_checkpoint",
    "resolve_resume", "restore_rng_state", "rng_file", "rotate_checkpoints", "save_state_file", "step_of",
]

# --------------------------------------------------------------------------- #
# Finding checkpoints
# --------------------------------------------------------------------------- #


def resolve_resume(resume_from: str | None, output_dir: str | os.PathLike[str]) -> Path | None:
    """Where to resume from: None (fresh run), `latest` in `output_dir`, or a given folder.

    `latest` with no checkpoint yet is a fresh start, so the same command can be
    used to start a job and to restart it after preemption.
    """
    if not resume_from:
        return None
    if resume_from == "latest":
        # The newest checkpoint that is whole; a broken newer one is named and skipped.
        ckpts = list_checkpoints(output_dir)
        for _, folder in reversed(ckpts):
            bad = find_corruption(folder)
            if bad is None:
                if folder != ckpts[-1][1]:
                    logging.getLogger("mmtune.train").warning(
                        "resume_from=latest: resuming from %s, the newest intact checkpoint", folder)
                return folder
            logging.getLogger("mmtune.train").warning("resume_from=latest: skipping %s: %s", folder,
                                                       corruption_message(folder, *bad))
        if ckpts:
            raise CheckpointError(corruption_message(ckpts[-1][1], *find_corruption(ckpts[-1][1])))
        return None
    folder = resolve_checkpoint(resume_from)
    bad = find_corruption(folder)
    if bad is not None:
        raise CheckpointError(corruption_message(folder, *bad))
    return folder


def step_of(folder: str | os.PathLike[str]) -> int:
    state = read_trainer_state(folder)
    return int(state["step"])


# --------------------------------------------------------------------------- #
# Atomic write, rotation, clean-up
# --------------------------------------------------------------------------- #


def begin_checkpoint(output_dir: str | os.PathLike[str], step: int) -> Path:
    """Create an empty temp folder for checkpoint `step` (removing a stale one)."""
    return fresh_dir(temp_checkpoint_path(output_dir, step))


def _fsync_tree(folder: Path) -> None:
    # Data must be on disk before the rename makes the folder visible as complete.
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_checkpoint(output_dir: str | os.PathLike[str], step: int, state: dict[str, Any]) -> Path:
    """Write the state file last, fsync, and rename the temp folder into place.

    An existing `checkpoint-STEP` (a re-save of the same step) is moved aside
    first and deleted only after the new one is in place.
    """
    tmp = temp_checkpoint_path(output_dir, step)
    write_json_atomic(state, tmp / STATE_FILE, fsync=True, sort_keys=True)
    _fsync_tree(tmp)
    final = checkpoint_path(output_dir, step)
    # The previous copy waits under the name remove_stale_temps puts back after a crash.
    replace_dir(tmp, final, aside=old_checkpoint_path(output_dir, step))
    _fsync_dir(Path(output_dir))
    return final



def rotate_checkpoints(output_dir: str | os.PathLike[str], keep: int, protect: Path | None = None) -> list[Path]:
    """Delete the oldest checkpoints so at most `keep` remain (`keep <= 0`: keep all).

    `protect` (the checkpoint a run resumed from) is never deleted.
    """
    if keep <= 0:
        return []
    ckpts = list_checkpoints(output_dir)
    removed = []
    excess = len(ckpts) - keep
    for _, path in ckpts:
        if excess <= 0:
            break
        if protect is not None and path.resolve() == Path(protect).resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        excess -= 1
    return removed


# best/ was written through atomic_dir before it had fixed names: DIR/.best.tmp-PID, DIR/.best.old-PID.
_LEGACY_BEST_TMP, _LEGACY_BEST_OLD = f".{runs.BEST_DIR}.tmp-", f".{runs.BEST_DIR}.old-"


def _swap_target(root: Path, name: str) -> tuple[Path, Callable[[Path], bool]] | None:
    """For a moved-aside folder's name: the folder it stands for and what makes it whole; else None."""
    if name.startswith(OLD_PREFIX):
        return root / (runs.CHECKPOINT_PREFIX + name[len(OLD_PREFIX):]), is_training_checkpoint
    if name == runs.OLD_BEST or name.startswith(_LEGACY_BEST_OLD):
        return root / runs.BEST_DIR, lambda folder: (folder / runs.BEST_FILE).is_file()
    return None


def remove_stale_temps(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Clear what crashed saves left in a run folder; returns the folders removed.

    Removed: half-written temp folders (`.tmp-checkpoint-*`, `.tmp-best`) and
    moved-aside copies (`.old-checkpoint-*`, `.old-best`) whose replacement is
    in place. A moved-aside copy whose final folder is missing (a crash between
    the two renames of `replace_dir`) is put back instead, and logged.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = []
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        swap = _swap_target(root, child.name)
        if swap is not None:
            final, whole = swap
            if not final.exists() and whole(child):
                os.replace(child, final)
                logging.getLogger("mmtune.train").warning(
                    "%s: put back from %s, where an interrupted save had moved it", final, child.name)
                continue
        half_written = child.name == runs.TMP_BEST or child.name.startswith((runs.TMP_PREFIX, _LEGACY_BEST_TMP))
        if swap is not None or half_written:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def read_trainer_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: not a checkpoint (no {STATE_FILE})") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None


# --------------------------------------------------------------------------- #
# Tensor state files (optimizer, scheduler, RNG)
# --------------------------------------------------------------------------- #


def save_state_file(obj: Any, path: str | os.PathLike[str]) -> None:
    torch.save(obj, str(path))


def load_state_file(path: str | os.PathLike[str]) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain values only, never arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc})".splitlines()[0]) from None


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # a different GPU count: at least this process's device continues its stream
            torch.cuda.set_rng_state(cuda_states[min(torch.cuda.current_device(), len(cuda_states) - 1)])
