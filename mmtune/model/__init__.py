"""mmtune.model: LLMs and LLaVA-style MLLMs (vision tower + projector + causal LM).

from mmtune.model import build_model, load_model, save_model, apply_lora
bundle = build_model(cfg.model)            # ModelBundle(model, tokenizer, image_transform, ...)
bundle.model.set_trainable("instruct")
"""

from mmtune.model.build import ModelBundle, build_model
from mmtune.model.io import load_model, save_model
from mmtune.model.lora import apply_lora, merge_lora
from mmtune.model.mllm import MMTuneModel

__all__ = [
    "ModelBundle",
    "MMTuneModel",
    "apply_lora",
    "build_model",
    "load_model",
    "merge_lora",
    "save_model",
]
