"""Saving and loading an MMTuneModel: config + tokenizer + the weights the config cannot rebuild.

A saved model folder holds

    model_config.yaml        the ModelConfig it was built from
    model_parts.json         which weight files follow (and the image-token layout)
    tokenizer/               the tokenizer (a trained byte-level BPE is saved, not re-trained)
    projector.safetensors    always in mllm mode
    lm/                      the full LM as a Hugging Face folder (config.json + safetensors),
                             when it was random-init, fully trained, merged, or loaded that way
    adapter/                 the peft LoRA adapter (adapter_config.json + adapter_model.safetensors)
    vision.safetensors       the tower, when random-init or unfrozen
    sharded/                 instead of the weight files above, in a checkpoint of an FSDP run:
                             every parameter, written shard by shard with torch.distributed.checkpoint;
                             `load_model` consolidates it in memory, `mmtune consolidate` to safetensors.
                             A LoRA run's shards hold the adapter too (under peft's names), and
                             adapter/ holds only adapter_config.json, so the adapter is rebuilt
                             before the shards are read; consolidating gives adapter/ + lm/ as
                             an unsharded LoRA run writes them

Frozen pretrained parts are not copied: `load_model` rebuilds them from the
config (the same hub id / folder), so an align-stage checkpoint of a 7B LLaVA
is a few tens of MB. Everything is safetensors; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmtune.config import ModelConfig, load_config, save_config
from mmtune.data.tokenizer import load_tokenizer
from mmtune.dcp_metadata import METADATA_FILE, safe_file_system_reader
from mmtune.errors import MMTuneError
from mmtune.integrity import corruption_message, find_corruption
from mmtune.model.build import ModelBundle, build_model, dtype_name

# The folder's file names belong to mmtune.runs (the one owner of the run-folder layout).
from mmtune.runs import (
    ADAPTER_DIR,
    LM_DIR,
    MODEL_CONFIG_FILE,
    PARTS_FILE,
    PROJECTOR_FILE,
    TOKENIZER_DIR,
    VISION_FILE,
    resolve_model_folder,
)

SHARDED_DIR = "sharded"  # an FSDP checkpoint's torch.distributed.checkpoint folder
SHARDED_MODEL_KEY = "model"
FORMAT_VERSION = 1


def save_model(bundle: ModelBundle, folder: str | Path, *, sharded: bool = False) -> None:
    """Write `bundle` into the EXISTING folder `folder` (the caller makes it a temp folder and renames it).

    `sharded=True` (an FSDP run): config, tokenizer and `model_parts.json` only;
    the weights are in `sharded/`, which every process writes itself.
    """
    from safetensors.torch import save_file
    from safetensors.torch import save_model as save_module

    folder = Path(folder)
    if not folder.is_dir():
        raise MMTuneError(f"save_model: folder {folder} does not exist (create it, ideally as a temp folder)")
    model = bundle.model
    save_config(bundle.config, folder / MODEL_CONFIG_FILE)
    bundle.tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    parts: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "mode": bundle.config.mode,
        "num_image_tokens": model.num_image_tokens,
        "image_token_id": model.image_token_id,
        "lm": False,
        "adapter": False,
        "vision": False,
        "projector": False,
    }
    if sharded:
        parts["sharded"] = SHARDED_DIR
        parts["owned_parts"] = sorted(model.owned_parts)
        if model.has_lora:  # the adapter's shape (its weights are in sharded/)
            model.lm.peft_config["default"].save_pretrained(str(folder / ADAPTER_DIR))
            parts["sharded_adapter"] = ADAPTER_DIR
        (folder / PARTS_FILE).write_text(json.dumps(parts, indent=2) + "\n", encoding="utf-8")
        return
    if model.projector is not None:
        save_file(_cpu_state(model.projector), str(folder / PROJECTOR_FILE))
        parts["projector"] = True
    if model.vision is not None and "vision" in model.owned_parts:
        save_module(model.vision, str(folder / VISION_FILE))  # handles tied/shared tensors
        parts["vision"] = True
    if model.has_lora:
        model.lm.save_pretrained(str(folder / ADAPTER_DIR), save_embedding_layers=False)
        parts["adapter"] = True
        if "lm" in model.owned_parts:
            base = model.base_lm()
            base.save_pretrained(str(folder / LM_DIR), state_dict=_base_state_without_lora(base))
            parts["lm"] = True
    elif "lm" in model.owned_parts:
        model.lm.save_pretrained(str(folder / LM_DIR))
        parts["lm"] = True
    (folder / PARTS_FILE).write_text(json.dumps(parts, indent=2) + "\n", encoding="utf-8")


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _base_state_without_lora(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA-injected model's weights under the plain model's names (adapters left out)."""
    out = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def load_model(
    folder: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    sharded_weights: bool = True,
    dequantize: bool | None = None,
    trust_remote_code: bool = False,
) -> ModelBundle:
    """Rebuild a saved model (see module docstring); `folder` may also be a run folder (latest checkpoint).

    `dtype` overrides the LM dtype the config names (e.g. "bfloat16" for inference on GPU).
    A sharded (FSDP) checkpoint is consolidated in memory; `sharded_weights=False`
    skips that (the trainer loads the shards itself after sharding the model).
    A QLoRA checkpoint (`model.lm.quantization`) loads its base LM in k-bit
    again, unless `dequantize` (default: when there is no CUDA GPU), which loads
    the base weights un-quantized in the quantization's compute dtype, e.g. for
    `mmtune export`, which merges the adapter into them.
    `trust_remote_code` is the USER's word (a command-line flag or their own
    config), never the checkpoint's: a checkpoint that needs remote code is
    refused unless it is True (see `load_model_config`).
    """
    from safetensors.torch import load_file

    folder = resolve_model_folder(folder)
    bad = find_corruption(folder)  # a truncated / garbled file is named, with the earlier intact checkpoint
    if bad is not None:
        raise MMTuneError(corruption_message(folder, *bad))
    cfg = load_model_config(folder, trust_remote_code=trust_remote_code)
    parts = read_parts(folder)
    if cfg.lm.quantization.bits and (dequantize or (dequantize is None and not torch.cuda.is_available())):
        cfg.lm.dtype = cfg.lm.quantization.compute_dtype
        cfg.lm.quantization.bits = None
    if dtype is not None:
        cfg.lm.dtype = dtype if isinstance(dtype, str) else dtype_name(dtype)
    tokenizer = load_tokenizer(folder / TOKENIZER_DIR, trust_remote_code=trust_remote_code)  # the user's word

    def weights(name: str) -> dict[str, torch.Tensor] | None:
        if not parts.get(name):
            return None
        path = folder / (PROJECTOR_FILE if name == "projector" else VISION_FILE)
        if not path.is_file():
            raise MMTuneError(f"{folder}: {path.name} is missing ({PARTS_FILE} lists it)")
        return load_file(str(path))

    lm_folder = None
    if parts.get("lm"):
        lm_folder = folder / LM_DIR
        if not lm_folder.is_dir():
            raise MMTuneError(f"{folder}: {LM_DIR}/ is missing ({PARTS_FILE} lists it)")
    bundle = build_model(
        cfg,
        tokenizer=tokenizer,
        lm_folder=lm_folder,
        vision_state=weights("vision"),
        projector_state=weights("projector"),
    )
    if parts.get("sharded"):
        bundle.model.owned_parts.update(parts.get("owned_parts") or ())
        if parts.get("sharded_adapter"):
            _apply_saved_lora(bundle.model, folder / ADAPTER_DIR)
        if sharded_weights:
            load_full_model_state(folder, bundle.model)
    if parts.get("adapter"):
        from peft import PeftModel

        model = bundle.model
        model.lm = PeftModel.from_pretrained(model.lm, str(folder / ADAPTER_DIR), is_trainable=False)
    saved_n = parts.get("num_image_tokens")
    if saved_n is not None and saved_n != bundle.num_image_tokens:
        raise MMTuneError(
            f"{folder}: saved with {saved_n} image tokens but the rebuilt tower gives {bundle.num_image_tokens}"
        )
    if device is not None:
        bundle.model.to(device)
    bundle.model.eval()
    return bundle


REMOTE_CODE_FLAG = "--trust-remote-code"


def remote_code_reasons(folder: Path, cfg: ModelConfig) -> list[str]:
    """Why loading `folder` would run code shipped with it (empty: it would not).

    A saved config that switches trust_remote_code on, an `auto_map` in the
    tokenizer's or the LM's Hugging Face config, or a Python file anywhere in
    the checkpoint all count.
    """
    reasons = []
    for part in ("tokenizer", "lm"):
        if getattr(cfg, part).trust_remote_code:
            reasons.append(f"{MODEL_CONFIG_FILE} sets {part}.trust_remote_code")
    for rel in (f"{TOKENIZER_DIR}/tokenizer_config.json", f"{LM_DIR}/config.json", f"{ADAPTER_DIR}/adapter_config.json"):
        path = folder / rel
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue  # the loader names the broken file
            if isinstance(data, dict) and data.get("auto_map"):
                reasons.append(f"{rel} names custom classes (auto_map)")
    reasons += [f"it ships {p.relative_to(folder).as_posix()}" for p in sorted(folder.rglob("*.py"))[:1]]
    return reasons


def load_model_config(folder: Path, *, trust_remote_code: bool = False) -> ModelConfig:
    """The checkpoint's ModelConfig with trust_remote_code taken from the user, not the file.

    A checkpoint that would run its own code is refused (one line naming
    --trust-remote-code) unless the user passed `trust_remote_code=True`; the
    returned config never trusts more than the user does.
    """
    cfg = load_config(folder / MODEL_CONFIG_FILE, ModelConfig)
    reasons = remote_code_reasons(folder, cfg)
    if reasons and not trust_remote_code:
        raise MMTuneError(
            f"{folder}: refusing to run code that comes with this checkpoint ({reasons[0]}); "
            f"pass {REMOTE_CODE_FLAG} (or set trust_remote_code in your own config) only if you trust its source"
        )
    cfg.tokenizer.trust_remote_code = bool(trust_remote_code and cfg.tokenizer.trust_remote_code)
    cfg.lm.trust_remote_code = bool(trust_remote_code and cfg.lm.trust_remote_code)
    return cfg


def read_parts(folder: Path) -> dict[str, Any]:
    """model_parts.json of a checkpoint ({} when absent); a corrupt one is a one-line error naming it."""
    path = folder / PARTS_FILE
    if not path.is_file():
        return {}
    try:
        parts = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MMTuneError(f"{path}: corrupt ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(parts, dict):
        raise MMTuneError(f"{path}: corrupt (expected a JSON object)")
    if parts.get("format", FORMAT_VERSION) > FORMAT_VERSION:
        raise MMTuneError(f"{folder}: saved by a newer mmtune (format {parts['format']})")
    return parts


def load_full_model_state(folder: str | Path, model: torch.nn.Module) -> None:
    """Fill an ordinary (unsharded) model from `folder/sharded/` in this one process (no process group needed).

    torch.distributed.checkpoint reads every process's shard files and
    reassembles each tensor into the model's own (full) state dict.
    """
    import torch.distributed.checkpoint as dcp

    source = Path(folder) / SHARDED_DIR
    if not (source / METADATA_FILE).is_file():
        raise MMTuneError(f"{folder}: {PARTS_FILE} says the weights are sharded but {SHARDED_DIR}/.metadata is missing")
    state = dict(model.state_dict())
    reader = safe_file_system_reader(source)  # DCP's .metadata is a pickle: refused unless only DCP's classes
    try:
        dcp.load({SHARDED_MODEL_KEY: state}, storage_reader=reader, no_dist=True)
    except Exception as exc:  # noqa: BLE001 - DCP raises several kinds; one line names the folder
        raise MMTuneError(f"{source}: cannot consolidate the sharded weights into the configured model "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    model.load_state_dict(state, strict=True)


def _apply_saved_lora(model: torch.nn.Module, adapter_dir: Path) -> None:
    """Wrap `model.lm` in the LoRA adapter `adapter_dir/adapter_config.json` describes (weights come from the shards).

    Frozen, as `PeftModel.from_pretrained(is_trainable=False)` leaves a saved adapter; the
    trainer unfreezes it (`set_trainable`) when it resumes.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    try:
        cfg = PeftLoraConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError) as exc:
        raise MMTuneError(f"{adapter_dir}: cannot read the adapter config of this sharded LoRA checkpoint "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    cfg.inference_mode = True
    model.lm = get_peft_model(model.lm, cfg)


def is_sharded(folder: str | Path) -> bool:
    """True for a checkpoint whose weights are FSDP shards (`sharded/`)."""
    path = Path(folder) / PARTS_FILE
    return path.is_file() and bool(json.loads(path.read_text(encoding="utf-8")).get("sharded"))

