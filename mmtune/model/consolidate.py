"""`mmtune consolidate`: a sharded (FSDP) checkpoint -> an ordinary saved model with safetensors weights.

    mmtune consolidate RUN_OR_CHECKPOINT [--out DIR]

An FSDP run's checkpoint keeps its weights as torch.distributed.checkpoint
shards (`sharded/`, one file per process). `load_model` already reassembles
them in memory, so `mmtune export`, `generate` and `eval` read such a
checkpoint as is; this command writes the reassembled model once, as the
usual `model_config.yaml` + `tokenizer/` + safetensors files, so later reads
are plain safetensors and the shards may be archived. The output is written to
a temporary folder and renamed into place; an existing DIR is never
overwritten. Default DIR: `CHECKPOINT-consolidated` next to the checkpoint.
The run's `run_config.yaml` is copied along, so the template is still found.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mmtune.errors import MMTuneError
from mmtune.fileio import atomic_dir
from mmtune.model.io import is_sharded, load_model, save_model
from mmtune.runs import resolve_model_folder


def consolidate(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Write the consolidated model of `checkpoint` (a checkpoint or run folder) to `out`; returns `out`."""
    folder = resolve_model_folder(checkpoint)
    if not is_sharded(folder):
        raise MMTuneError(f"{folder}: not a sharded checkpoint (its weights are already ordinary safetensors files)")
    target = Path(out) if out is not None else folder.parent / f"{folder.name}-consolidated"
    if target.exists():
        raise MMTuneError(f"{target}: already exists; choose another --out (nothing was overwritten)")
    bundle = load_model(folder)
    with atomic_dir(target) as tmp:
        save_model(bundle, tmp)
        for name in ("run_config.yaml",):
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
    return target
