"""A `LlavaForConditionalGeneration` folder (llava-hf, or `mmtune export --format hf-llava`) as mmtune parts.

`model.init_from: PATH` starts a run from such a folder: its vision tower
(CLIP or SigLIP), projector, language model, tokenizer and image-processor
settings, with the feature layer, feature selection and image token its
config.json names. `read_llava_folder` loads the folder once with
transformers and hands the pieces over without copying weights (when the
caller brings its own fine-tuned LM, as `load_model` does for a checkpoint
that trained it, only the tower and projector tensors are read); `apply_to`
writes the folder's settings into the run's ModelConfig, so the run's
model_config.yaml records what was actually built.

Contract: the folder's config.json has `model_type: llava`; a single
`vision_feature_layer` (an int); `vision_feature_select_strategy` `default`
(drop CLS: mmtune's `patch`) or `full`; `projector_hidden_act: gelu` with
biases (mmtune's `mlp2x_gelu`). Anything else is refused with a one-line
error naming the folder and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtune.config import ModelConfig
from mmtune.errors import MMTuneError

SELECT = {"default": "patch", "full": "full"}


@dataclass
class LlavaParts:
    """What a LLaVA folder provides, ready to be placed into an MMTuneModel."""

    folder: Path
    lm: nn.Module | None  # None when the caller substitutes its own LM (a saved fine-tuned one)
    vision_model: nn.Module
    projector_state: dict[str, torch.Tensor]
    processor_cfg: dict[str, Any]
    feature_layer: int
    select_strategy: str
    pad_to_square: bool
    image_token_index: int

    def apply_to(self, cfg: ModelConfig) -> None:
        """Make `cfg` describe this folder's model (mllm, hf tower, its layer/selection, mlp2x_gelu)."""
        cfg.mode = "mllm"
        cfg.vision.backend = "hf"
        cfg.vision.feature_layer = self.feature_layer
        cfg.vision.select_strategy = self.select_strategy
        cfg.vision.pad_to_square = self.pad_to_square
        cfg.projector.type = "mlp2x_gelu"


def _config(folder: Path) -> Any:
    from transformers import AutoConfig

    where = f"model.init_from: {folder}"
    if not (folder / "config.json").is_file():
        raise MMTuneError(f"{where} has no config.json (expected a LlavaForConditionalGeneration folder)")
    try:
        conf = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise MMTuneError(f"{where}: config.json cannot be read ({str(exc).splitlines()[0]})") from None
    if conf.model_type != "llava":
        raise MMTuneError(f"{where}: config.json model_type is {conf.model_type!r}, not 'llava'")
    if not isinstance(conf.vision_feature_layer, int):
        raise MMTuneError(f"{where}: vision_feature_layer {conf.vision_feature_layer!r} (several layers) is not supported")
    if conf.vision_feature_select_strategy not in SELECT:
        raise MMTuneError(f"{where}: vision_feature_select_strategy {conf.vision_feature_select_strategy!r} "
                          f"is not one of {', '.join(SELECT)}")
    if conf.projector_hidden_act != "gelu" or not getattr(conf, "multimodal_projector_bias", True):
        raise MMTuneError(f"{where}: projector_hidden_act {conf.projector_hidden_act!r} (bias "
                          f"{getattr(conf, 'multimodal_projector_bias', True)}) is not mmtune's mlp2x_gelu (gelu, bias)")
    if conf.vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise MMTuneError(f"{where}: vision tower {conf.vision_config.model_type!r} is not CLIP or SigLIP")
    return conf


def _processor_settings(folder: Path, vision_config: Any) -> tuple[dict[str, Any], bool]:
    """The folder's image processor settings (resize/crop/normalize) and whether it pads to square.

    A folder with no preprocessor_config.json gets the tower family's defaults
    (CLIP: resize + centre crop to image_size, OpenAI CLIP mean/std; SigLIP: resize, 0.5 mean/std).
    """
    from transformers import AutoImageProcessor

    from mmtune.model.towers.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from mmtune.model.towers.hf_tower import _pretrained_processor_cfg

    cfg = _pretrained_processor_cfg(str(folder))
    if cfg is None:
        size = int(vision_config.image_size)
        if "siglip" in vision_config.model_type:
            cfg = {"size": {"height": size, "width": size}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        else:
            cfg = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
                   "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}
        return cfg, False
    info = folder / "mmtune_export.json"  # written by `mmtune export`: the backend that matches mmtune's pixels
    if info.is_file():
        try:
            backend = json.loads(info.read_text(encoding="utf-8")).get("image_backend")
        except (ValueError, AttributeError):
            raise MMTuneError(f"model.init_from: {info} is not a JSON object") from None
        if backend:
            cfg["_backend"] = str(backend)
    try:
        proc = AutoImageProcessor.from_pretrained(str(folder))
    except (OSError, ValueError):
        return cfg, False
    return cfg, bool(getattr(proc, "do_pad", False))


def read_llava_folder(path: str | Path, *, dtype: torch.dtype | str | None = None, load_lm: bool = True) -> LlavaParts:
    """Load `path` with transformers and split it into LM, tower and projector weights (no copies)."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    folder = Path(path)
    conf = _config(folder)
    processor_cfg, pad = _processor_settings(folder, conf.vision_config)
    if not load_lm:  # the caller has its own (fine-tuned) LM: read only the tower and projector tensors
        vision_model, projector_state = _tower_and_projector(folder, conf, dtype)
        return LlavaParts(folder=folder, lm=None, vision_model=vision_model, projector_state=projector_state,
                          processor_cfg=processor_cfg, feature_layer=int(conf.vision_feature_layer),
                          select_strategy=SELECT[conf.vision_feature_select_strategy], pad_to_square=pad,
                          image_token_index=int(conf.image_token_index))
    try:
        hf = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise MMTuneError(f"model.init_from: {folder}: weights cannot be loaded ({str(exc).splitlines()[0]})") from None
    core = hf.model
    lm = None
    if load_lm:
        # The language model and lm_head move, tensor for tensor, into a plain causal LM of the text config.
        text_config = conf.get_text_config()
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(text_config, dtype=next(hf.parameters()).dtype)
        prefix = lm.base_model_prefix + "."
        state = {prefix + k: v for k, v in core.language_model.state_dict().items()}
        state.update({f"lm_head.{k}": v for k, v in hf.lm_head.state_dict().items()})
        missing, unexpected = lm.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not (k == "lm_head.weight" and lm.config.tie_word_embeddings)]
        if missing or unexpected:
            raise MMTuneError(f"model.init_from: {folder}: language model weights do not map onto "
                              f"{type(lm).__name__} ({len(missing)} missing, {len(unexpected)} unexpected)")
        lm.tie_weights()
        for name, buf in list(lm.named_buffers()):  # non-persistent buffers (rotary inv_freq) are rebuilt
            if buf.is_meta:
                _rebuild_buffers(lm, hf)
                break
        lm.generation_config = hf.generation_config
    projector_state = {k: v for k, v in core.multi_modal_projector.state_dict().items()}
    return LlavaParts(
        folder=folder,
        lm=lm,
        vision_model=core.vision_tower,
        projector_state=projector_state,
        processor_cfg=processor_cfg,
        feature_layer=int(conf.vision_feature_layer),
        select_strategy=SELECT[conf.vision_feature_select_strategy],
        pad_to_square=pad,
        image_token_index=int(conf.image_token_index),
    )


def _tower_and_projector(folder: Path, conf: Any, dtype: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Only the vision tower and projector tensors of the folder's safetensors (the LM's are not read).

    Both key layouts are accepted: transformers >= 4.52 writes `model.vision_tower.*` /
    `model.multi_modal_projector.*`; older llava-hf uploads have no `model.` prefix.
    """
    from safetensors import safe_open
    from transformers import AutoModel

    where = f"model.init_from: {folder}"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise MMTuneError(f"{where}: no model.safetensors (or its index); only safetensors weights are read")
    vision: dict[str, torch.Tensor] = {}
    projector: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                k = key.removeprefix("model.")
                if k.startswith("vision_tower."):
                    vision[k[len("vision_tower."):]] = f.get_tensor(key)
                elif k.startswith("multi_modal_projector."):
                    projector[k[len("multi_modal_projector."):]] = f.get_tensor(key)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    # Built on the CPU (not meta) so non-persistent buffers such as position_ids exist; a tower is small.
    model = AutoModel.from_config(conf.vision_config, dtype=torch_dtype)
    try:
        model.load_state_dict(vision, strict=True)
    except RuntimeError as exc:
        raise MMTuneError(f"{where}: vision tower weights do not fit its config ({' '.join(str(exc).split())[:200]})") from None
    return model.eval(), projector


def _rebuild_buffers(lm: nn.Module, hf: nn.Module) -> None:
    """Copy the non-persistent buffers (rotary embeddings) from the loaded LLaVA's language model."""
    source = dict(hf.model.language_model.named_buffers())
    prefix = lm.base_model_prefix + "."
    for name, buf in list(lm.named_buffers()):
        if not buf.is_meta:
            continue
        key = name.removeprefix(prefix)
        if key not in source:
            raise MMTuneError(f"cannot rebuild buffer {name!r} of the language model")
        module_name, _, attr = name.rpartition(".")
        module = lm.get_submodule(module_name)
        module._buffers[attr] = source[key]
        if hasattr(module, "original_inv_freq") and attr == "inv_freq":
            module.original_inv_freq = source[key].clone()
