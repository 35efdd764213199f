"""FSDP2 sharding of an MMTuneModel, and its sharded (torch.distributed.checkpoint) state.

Contract:
- `shard_model(model, mixed_precision)` applies torch's `fully_shard` (FSDP2)
  in place: one unit per LM decoder layer (the classes the LM names in
  `_no_split_modules`, e.g. `LlamaDecoderLayer`), one per vision-tower block
  (the tower's longest ModuleList of identical blocks), one for the rest of the
  tower, one for the projector, and the root (embeddings, final norm, head).
  Parts of different dtypes (a frozen bf16 tower, float32 master weights of the
  LM) therefore never share a unit, and frozen parameters shard like trainable
  ones. After it, every process holds 1/world of each parameter.
- LoRA (peft): the decoder layers are found through peft's wrapper (the base
  model's `_no_split_modules`), so each layer's unit holds its frozen base
  weights and its trainable `lora_A`/`lora_B` together: the frozen base is
  sharded (how a 13B/70B LoRA fits) and only the adapter has gradients.
  FSDP2 needs one dtype among a unit's *trainable* parameters only (the adapter
  is float32 master weights; a bf16 frozen base may share the unit, its
  all-gather copies mixed dtypes). A k-bit (QLoRA) LM is refused: its packed
  4-bit weights are not shardable here.
- Every process must run every unit's forward and backward in the same order
  (each forward all-gathers, each backward all-gathers and reduce-scatters):
  the LM's input embeddings are made to require grad, so a text-only batch's
  backward runs through every LM layer even when the embedding is frozen. And
  every process must run every unit's forward the same number of times: a
  text-only batch therefore runs the tower and projector on an empty image
  batch (`MMTuneModel.run_tower_on_text_batches`): no image, no dummy pixels,
  zero contribution to the loss and gradients, and the collectives line up
  with a rank whose batch had images.
- `save_sharded(folder, model, optimizer)` writes model + optimizer state with
  `torch.distributed.checkpoint` (each process its own shard files plus one
  `.metadata`) into `folder/SHARDED_DIR`; all processes call it.
  `load_sharded(folder, model, optimizer)` is the inverse into an already
  sharded model, for resuming with the same number of processes.
- `mmtune.model.io.load_model` reads the same files into an ordinary
  (unsharded) model in one process: this is how `mmtune consolidate`,
  `export`, `generate` and `eval` read a sharded checkpoint.

Why by hand: accelerate's FSDP2 path (`accelerate launch` with an FSDP config)
only exists for GPU process groups and wraps by class name through a policy
that cannot see our dtype boundaries; the wrap plan is the model layout, which
is mmtune's, so it lives here, on torch's own `fully_shard`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtune.dcp_metadata import METADATA_FILE, safe_file_system_reader
from mmtune.errors import MMTuneError
from mmtune.model.io import SHARDED_DIR, SHARDED_MODEL_KEY

MODEL_KEY = SHARDED_MODEL_KEY
OPTIM_KEY = "optimizer"


def fsdp_requested(distributed: str) -> bool:
    """`train.distributed: fsdp`, or `accelerate launch` with an FSDP config (ACCELERATE_USE_FSDP)."""
    if distributed == "fsdp":
        return True
    return distributed == "auto" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def _block_lists(module: nn.Module) -> list[nn.ModuleList]:
    """ModuleLists of two or more children of one class (transformer blocks), longest first."""
    found = []
    for mod in module.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and len({type(m) for m in mod}) == 1:
            found.append(mod)
    return sorted(found, key=len, reverse=True)


def wrap_plan(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(what, module) units in the order they are sharded: tower blocks, tower, projector, LM layers."""
    plan: list[tuple[str, nn.Module]] = []
    vision = getattr(model, "vision", None)
    if vision is not None:
        lists = _block_lists(vision)
        if lists:
            plan += [(f"vision block {i}", blk) for i, blk in enumerate(lists[0])]
        plan.append(("vision tower", vision))
    projector = getattr(model, "projector", None)
    if projector is not None:
        plan.append(("projector", projector))
    lm = model.base_lm() if hasattr(model, "base_lm") else getattr(model, "lm", model)
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:  # an LM that does not name its layer class: its longest block list
        lists = _block_lists(lm)
        layers = list(lists[0]) if lists else []
    if not layers:
        raise MMTuneError(f"train.distributed=fsdp: cannot find the decoder layers of {type(lm).__name__}")
    plan += [(f"lm layer {i}", layer) for i, layer in enumerate(layers)]
    return plan


def shard_model(model: nn.Module, mixed_precision: str = "no", mesh: Any = None) -> nn.Module:
    """Apply FSDP2 to `model` in place (see module docstring); returns it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    lm = model.base_lm() if hasattr(model, "base_lm") else getattr(model, "lm", model)
    if getattr(lm, "is_quantized", False) or getattr(lm, "hf_quantizer", None) is not None:
        raise MMTuneError("model.lm.quantization with train.distributed=fsdp is not supported: QLoRA runs "
                          "one model copy per GPU (DDP)")
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    # Parameters are gathered in the compute dtype; gradients are reduced in float32
    # into the float32 master shards the optimizer updates.
    mp = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()
    kwargs = {"mp_policy": mp, "mesh": mesh}
    for _, module in wrap_plan(model):
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    if hasattr(model, "run_tower_on_text_batches"):
        model.run_tower_on_text_batches = True
    if hasattr(lm, "enable_input_require_grads"):
        # The LM's input embeddings always require grad (transformers' hook), so every process's backward
        # runs through every LM layer in the same order: with a frozen embedding (LoRA, stage align) a
        # text-only batch's embeddings would otherwise need no grad while an image batch's do (the
        # projector's features), and the two processes' reduce-scatters / all-gathers would not line up.
        lm.enable_input_require_grads()
    return model


def _options(full: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def save_sharded(folder: str | os.PathLike[str], model: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Every process writes its shard of model (+ optimizer, when given) state into `folder/sharded/`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
    )

    target = Path(folder) / SHARDED_DIR
    if optimizer is None:  # a model folder (train.save_best's DIR/best): weights only
        dcp.save({MODEL_KEY: get_model_state_dict(model, options=_options())}, checkpoint_id=str(target))
        return target
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    dcp.save({MODEL_KEY: model_sd, OPTIM_KEY: optim_sd}, checkpoint_id=str(target))
    return target


def load_sharded(folder: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read `folder/sharded/` into the sharded `model` and its `optimizer` (same process count)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    source = Path(folder) / SHARDED_DIR
    if not (source / METADATA_FILE).is_file():
        raise MMTuneError(f"{folder}: no sharded state ({SHARDED_DIR}/.metadata missing)")
    reader = safe_file_system_reader(source)  # DCP's .metadata is a pickle: refused unless only DCP's classes
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    state = {MODEL_KEY: model_sd, OPTIM_KEY: optim_sd}
    try:
        dcp.load(state, storage_reader=reader)
    except Exception as exc:  # noqa: BLE001 - DCP raises several kinds; one line names the folder
        raise MMTuneError(f"{source}: cannot load the sharded state into this model "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY], optim_state_dict=state[OPTIM_KEY])
