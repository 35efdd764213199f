"""LoRA on the language model, through peft.

Only `model.lm` is wrapped; the projector (and an unfrozen tower) stay full
modules that `set_trainable` trains directly. `merge_lora` folds the adapter
back into a plain transformers model (for export or faster inference).
"""

from __future__ import annotations

from mmtune.config import LoraConfig
from mmtune.errors import MMTuneError
from mmtune.model.mllm import MMTuneModel


def apply_lora(model: MMTuneModel, cfg: LoraConfig) -> MMTuneModel:
    """Wrap `model.lm` in a peft LoRA model (in place; returns `model`).

    `target_modules: all-linear` targets every linear layer but the output head.
    Call `model.set_trainable(stage)` afterwards to choose what trains.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if model.has_lora:
        raise MMTuneError("LoRA is already applied to this model")
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        model.lm = get_peft_model(model.lm, peft_cfg)
    except ValueError as exc:
        raise MMTuneError(f"train.lora: {str(exc).splitlines()[0]}") from None
    return model


def merge_lora(model: MMTuneModel) -> MMTuneModel:
    """Fold the adapter into the LM weights (in place); the LM is then saved in full."""
    if not model.has_lora:
        raise MMTuneError("merge_lora: no LoRA adapter is applied")
    model.lm = model.lm.merge_and_unload()
    model.owned_parts.add("lm")
    model.owned_parts.discard("adapter")
    return model
