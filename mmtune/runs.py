"""The run folder: its layout, and which of its folders count as complete.

Every module that reads or writes a run folder asks this one (the trainer, the
model saver, export, eval, generate), so the layout and the completeness rules
live in one place. It sits at the bottom of the package with config/fileio/errors
and imports nothing else from mmtune.

A run folder (`mmtune train ... --output-dir RUN`) holds

    run_config.yaml          the RunConfig the run was started with
    metrics.jsonl, loss.png, train.log, train-rank{r}.log
    checkpoint-STEP/         one training checkpoint per saved step (below)
    best/                    train.save_best: the model folder of the lowest validation loss (+ best.json)
    .tmp-checkpoint-STEP/    a checkpoint being written (renamed when complete)
    .old-checkpoint-STEP/    a checkpoint being replaced by a re-save of the same step
    .tmp-best/, .old-best/   the same two for best/ (a new best being written; the previous one moved aside)

Two kinds of folder are told apart by name throughout mmtune:

- a **model folder** is what `mmtune.model.io.save_model` writes: model_config.yaml,
  model_parts.json, tokenizer/, projector.safetensors, vision.safetensors, lm/,
  adapter/. It is complete when it holds `model_config.yaml` (written first by
  save_model; a folder is only visible under its final name once complete).
  `resolve_model_folder` / `latest_model_folder` find one (generate, eval, export,
  `model.projector.checkpoint`).
- a **training checkpoint** is a model folder plus the training state
  (`TRAINING_STATE_FILES`: trainer_state.json, optimizer.pt, scheduler.pt,
  rng.pt / rng-rank{r}.pt, run_config.yaml). It is complete when it holds
  `trainer_state.json`, the last file written before the rename.
  `resolve_checkpoint` / `latest_checkpoint` / `list_checkpoints` find one (resume).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mmtune.errors import MMTuneError

# --- the run folder -------------------------------------------------------- #
RUN_CONFIG_FILE = "run_config.yaml"
METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"
LOG_FILE = "train.log"
CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
OLD_PREFIX = ".old-checkpoint-"
BEST_DIR = "best"  # train.save_best: the model of the lowest validation loss
BEST_FILE = "best.json"  # in BEST_DIR: {"step", "eval_loss"}
TMP_BEST = ".tmp-best"  # BEST_DIR being written (renamed when complete)
OLD_BEST = ".old-best"  # the previous BEST_DIR, moved aside until the new one is in place

# --- a model folder -------------------------------------------------------- #
MODEL_CONFIG_FILE = "model_config.yaml"
PARTS_FILE = "model_parts.json"
TOKENIZER_DIR = "tokenizer"
PROJECTOR_FILE = "projector.safetensors"
VISION_FILE = "vision.safetensors"
LM_DIR = "lm"
ADAPTER_DIR = "adapter"

# --- the training state a checkpoint adds ---------------------------------- #
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
TRAINING_STATE_FILES = (STATE_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, RUN_CONFIG_FILE)

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_RNG_RE = re.compile(r"^rng(?:-rank\d+)?\.pt$")
# Optimizer states other tools write next to a model (never read by mmtune, never model weights).
_FOREIGN_STATE_FILES = frozenset({"optimizer.safetensors", "optimizer.bin", METRICS_FILE})


class CheckpointError(MMTuneError):
    """A checkpoint or model folder that cannot be found or read (one line naming the folder)."""


def log_file(rank: int) -> str:
    """`train.log` for process 0, `train-rank{r}.log` for the others."""
    return LOG_FILE if rank == 0 else f"train-rank{rank}.log"


def rng_file(rank: int) -> str:
    """`rng.pt` for process 0 (the contract's name), `rng-rank{r}.pt` for the others."""
    return RNG_FILE if rank == 0 else f"rng-rank{rank}.pt"


def is_training_state_file(name: str) -> bool:
    """True for a file of a checkpoint that holds training state, not the model (any rank's rng file too)."""
    return name in TRAINING_STATE_FILES or name in _FOREIGN_STATE_FILES or bool(_RNG_RE.match(name))


def checkpoint_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(run_dir) / f"{CHECKPOINT_PREFIX}{step}"


def temp_checkpoint_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(run_dir) / f"{TMP_PREFIX}{step}"


def old_checkpoint_path(run_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(run_dir) / f"{OLD_PREFIX}{step}"


def temp_best_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / TMP_BEST


def old_best_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / OLD_BEST


def checkpoint_step(folder: str | os.PathLike[str]) -> int | None:
    """STEP of a folder named `checkpoint-STEP`, else None."""
    m = _CHECKPOINT_RE.match(Path(folder).name)
    return int(m.group(1)) if m else None


def _numbered(run_dir: str | os.PathLike[str], complete: Any) -> list[tuple[int, Path]]:
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = checkpoint_step(child)
        if step is not None and child.is_dir() and complete(child):
            found.append((step, child))
    return sorted(found)


# --------------------------------------------------------------------------- #
# Model folders
# --------------------------------------------------------------------------- #


def is_model_folder(path: str | os.PathLike[str]) -> bool:
    """True for a complete saved model folder (it holds model_config.yaml)."""
    return (Path(path) / MODEL_CONFIG_FILE).is_file()


def latest_model_folder(run_dir: str | os.PathLike[str]) -> Path | None:
    """The `checkpoint-STEP` model folder with the highest STEP, or None."""
    found = _numbered(run_dir, is_model_folder)
    return found[-1][1] if found else None


def resolve_model_folder(path: str | os.PathLike[str]) -> Path:
    """A saved model folder as is; a run folder -> its latest `checkpoint-STEP` model folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    if is_model_folder(path):
        return path
    latest = latest_model_folder(path) if path.is_dir() else None
    if latest is not None:
        return latest
    raise CheckpointError(f"{path}: not a saved model ({MODEL_CONFIG_FILE} missing) and holds no checkpoint-* folder")


# --------------------------------------------------------------------------- #
# Training checkpoints
# --------------------------------------------------------------------------- #


def is_training_checkpoint(folder: str | os.PathLike[str]) -> bool:
    """True for a complete training checkpoint (its state file is the last thing written)."""
    return (Path(folder) / STATE_FILE).is_file()


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete training checkpoints `checkpoint-STEP` of a run, oldest step first."""
    return _numbered(run_dir, is_training_checkpoint)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The complete training checkpoint with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A training checkpoint folder, or a run folder meaning its latest training checkpoint."""
    p = Path(path).expanduser()
    if is_training_checkpoint(p):
        return p
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest
        raise CheckpointError(
            f"{p}: neither a checkpoint folder (no {STATE_FILE}) nor a run folder with checkpoint-* inside"
        )
    raise CheckpointError(f"{p}: checkpoint folder not found")


# --------------------------------------------------------------------------- #
# run_config.yaml
# --------------------------------------------------------------------------- #


def run_config_path(folder: str | os.PathLike[str]) -> Path | None:
    """The run_config.yaml that describes `folder`: its own copy (a checkpoint), else its run folder's."""
    folder = Path(folder)
    for d in (folder, folder.parent):
        path = d / RUN_CONFIG_FILE
        if path.is_file():
            return path
    return None


def read_run_config(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The raw run_config.yaml describing a checkpoint / model folder, or None when there is none.

    Raw (a dict), not a RunConfig: a folder written by an older or newer mmtune
    still tells its template and held-out tasks.
    """
    from mmtune.config import load_yaml

    path = run_config_path(folder)
    return load_yaml(path) if path is not None else None


def run_config_value(folder: str | os.PathLike[str], dotted: str) -> Any:
    """One value of the run_config.yaml describing `folder` (`"data.template"`), None when absent."""
    node: Any = read_run_config(folder)
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def trained_template(folder: str | os.PathLike[str]) -> str | None:
    """The chat template the run trained with (its `data.template`), or None."""
    template = run_config_value(folder, "data.template")
    return template if isinstance(template, str) and template else None


def write_run_config(cfg: Any, folder: str | os.PathLike[str]) -> Path:
    """Save a RunConfig as `folder/run_config.yaml` atomically (temp file, then rename)."""
    from mmtune.config import save_config

    path = Path(folder) / RUN_CONFIG_FILE
    save_config(cfg, path)
    return path
