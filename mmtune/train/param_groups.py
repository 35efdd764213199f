"""Optimizer parameter groups: one learning rate per model part, no weight decay on biases and norms.

Contract: `param_groups(named_params, cfg)` returns AdamW groups keyed by
(part, decay). The part of a parameter is the first component of its name in
an `MMTuneModel` (`vision.*`, `projector.*`, `lm.*`); a bare module (tests,
LLM-only code paths) is all `lm`. Learning rates: `train.vision_lr`,
`train.projector_lr` (LLaVA's `mm_projector_lr`), `train.lr` for the LM and
for any part whose own rate is null. Weight decay applies to matrices only:
biases, norm gains/biases (any module whose class name contains `Norm`, which
covers LayerNorm, RMSNorm and the LLaMA/Qwen/CLIP variants) and every other
1-D tensor get 0, as LLaVA (through HF Trainer) and nanoGPT do. Each group
carries a `name` ("projector", "lm (no decay)", ...) so the trainer can print
it with its parameter count before step 1; torch keeps extra group keys in
the optimizer state, so the names survive a checkpoint.

Groups that would be empty are left out, so the group layout depends only on
what trains; a resumed run with the same stage/LoRA settings gets the same
layout and the saved optimizer state fits.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mmtune.config import TrainConfig

PARTS = ("vision", "projector", "lm")


def part_of(name: str) -> str:
    """`vision.visual.conv1.weight` -> vision; `projector.*` -> projector; everything else -> lm."""
    head = name.split(".", 1)[0]
    return head if head in ("vision", "projector") else "lm"


def part_lr(part: str, cfg: TrainConfig) -> float:
    own = {"vision": cfg.vision_lr, "projector": cfg.projector_lr}.get(part)
    return float(own) if own is not None else float(cfg.lr)


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Names of every parameter that belongs to a normalisation layer."""
    names: set[str] = set()
    for mod_name, mod in model.named_modules():
        if "Norm" in type(mod).__name__:
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def decays(name: str, param: torch.Tensor, norm_names: set[str]) -> bool:
    """Weight decay only for matrices that are not biases or norm parameters."""
    return param.ndim >= 2 and not name.endswith("bias") and name not in norm_names


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], cfg: TrainConfig, norm_names: set[str] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups for the trainable parameters (see module docstring); empty groups dropped."""
    norm_names = norm_names or set()
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        buckets.setdefault((part_of(name), decays(name, p, norm_names)), []).append(p)
    groups = []
    for part in PARTS:
        for decay in (True, False):
            params = buckets.get((part, decay))
            if not params:
                continue
            groups.append({
                "name": part if decay else f"{part} (no decay)",
                "params": params,
                "lr": part_lr(part, cfg),
                "weight_decay": float(cfg.weight_decay) if decay else 0.0,
            })
    return groups


def describe_groups(groups: list[dict[str, Any]], numel: dict[int, int] | None = None) -> str:
    """One line per optimizer group: name, parameter count, tensors, lr, weight decay.

    `numel` maps id(param) -> full element count, for parameters that are
    sharded by the time this is printed (FSDP keeps only a slice per process).
    """
    rows = []
    for g in groups:
        n = sum((numel or {}).get(id(p), p.numel()) for p in g["params"])
        rows.append(f"  group {g.get('name', '?'):<20} {n:>14,} params in {len(g['params']):>4} tensors, "
                    f"lr {g['lr']:.3g}, weight decay {g['weight_decay']:g}")
    return "\n".join(rows)
