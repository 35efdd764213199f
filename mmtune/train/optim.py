"""What a run trains with: the AdamW optimizer, the LR schedule, the autocast precision.

The recipe (`mmtune.train.run.train`) builds these once per run; each is tested
on its own (tests/test_train_components.py, tests/test_precision.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from mmtune.config import TrainConfig
from mmtune.errors import MMTuneError


def resolve_mixed_precision(
    name: str, weights_dtype: torch.dtype | None = None, dtype_key: str = "model.lm.dtype"
) -> str:
    """The autocast mode: `auto` -> the half type the frozen weights are stored in (`model.lm.dtype`),
    else bf16 on a CUDA GPU that supports it, else no; fp16 needs CUDA.

    Trainable weights are float32 masters whatever `model.lm.dtype` says (see
    `mmtune.train.precision`), so a model stored in bfloat16 computes under
    bf16 autocast; `no` with half-precision weights is refused, because the
    float32 and half parts could not be multiplied together without it.
    """
    name = str(name).lower()
    cuda = torch.cuda.is_available()
    half = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(weights_dtype)  # type: ignore[arg-type]
    if name == "auto":
        if half is not None:
            name = half
        else:
            return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if name not in ("no", "bf16", "fp16"):
        raise MMTuneError(f"train.mixed_precision must be auto, no, bf16 or fp16; got {name!r}")
    if name == "fp16" and not cuda:
        raise MMTuneError("train.mixed_precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if name == "no" and half is not None:
        raise MMTuneError(f"train.mixed_precision no with {dtype_key} {weights_dtype}: trainable weights are kept in "
                          f"float32 and the frozen ones in {weights_dtype}, which needs autocast; set "
                          f"train.mixed_precision {half} (or auto), or {dtype_key} float32")
    return name


def build_optimizer(
    params: Iterable[tuple[str, torch.nn.Parameter]], cfg: TrainConfig, norm_names: set[str] | None = None
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, one group per part and decay kind (`mmtune.train.param_groups`).

    Biases and norm parameters (`norm_names`, and every 1-D tensor) are not
    decayed: shrinking them towards zero is not regularisation, it only changes
    the scale of activations.
    """
    from mmtune.train.param_groups import param_groups

    groups = param_groups(params, cfg, norm_names)
    if not groups:
        raise MMTuneError("nothing to train: every parameter is frozen (check train.stage / train.lora)")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return math.ceil(max(0.0, cfg.warmup_ratio) * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    """transformers' cosine (or constant) schedule with linear warmup over `warmup_ratio` of the steps."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
    )

    warm = warmup_steps(cfg, total_steps)
    if cfg.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warm, num_training_steps=total_steps)
    if cfg.lr_schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warm)
    raise MMTuneError(f"train.lr_schedule must be cosine or constant, got {cfg.lr_schedule!r}")
