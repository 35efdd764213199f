"""Training precision: float32 master weights for what trains, half precision only for what is frozen.

Contract: after `set_trainable`, `keep_trainable_fp32(model)` stores every
parameter with `requires_grad` in float32 (in place; tied weights stay tied)
and leaves frozen ones in the dtype they were built with (`model.lm.dtype`,
e.g. bfloat16 for a frozen 7B tower or LM). The forward runs under autocast
(`train.mixed_precision`, which defaults to the frozen weights' half type),
so matmuls still run in bf16/fp16 while AdamW updates float32 weights with
float32 moments.

Why: AdamW applied to bfloat16 weights rounds each update to bf16's 8-bit
mantissa. With LLaVA's lr 2e-5 a weight of size 1e-2 (spacing 6e-5 around it)
moves by ~2e-5 per step, less than half a spacing, so the update is rounded
away and most weights never change (`tests/test_precision.py` shows both
sides). LLaVA, TRL and prismatic all keep fp32 masters for the same reason.

Quantized (QLoRA) base weights are frozen and left alone; their LoRA adapters
are float32 already.
"""

from __future__ import annotations

import torch
from torch import nn


def keep_trainable_fp32(model: nn.Module) -> list[str]:
    """Upcast trainable parameters that are not float32 to float32; returns their names."""
    upcast = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad or not p.is_floating_point() or p.dtype == torch.float32:
            continue
        seen.add(id(p))
        p.data = p.data.to(torch.float32)
        upcast.append(name)
    return upcast


def weights_dtype(model: nn.Module) -> torch.dtype | None:
    """The lowest floating dtype a parameter is stored in (bf16/fp16 when any part is half), else float32."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    for half in (torch.float16, torch.bfloat16):
        if half in dtypes:
            return half
    return torch.float32 if dtypes else None


def optimizer_state_dtype(params: list[torch.Tensor]) -> torch.dtype:
    """AdamW keeps its moments in the dtype of the parameter they belong to."""
    dtypes = {p.dtype for p in params}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
