"""Projectors: vision features -> LM embedding space.

Named and laid out like transformers' `LlavaMultiModalProjector`
(`linear_1`, `act`, `linear_2`), so exporting to HF LLaVA is a renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from mmtune.config import ProjectorConfig
from mmtune.errors import MMTuneError

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


class Projector(nn.Module):
    """`linear`: one Linear. `mlp2x_gelu` (LLaVA-1.5): Linear -> GELU -> Linear."""

    def __init__(self, kind: str, vision_dim: int, lm_dim: int) -> None:
        super().__init__()
        if kind not in PROJECTOR_TYPES:
            raise MMTuneError(f"model.projector.type must be one of {', '.join(PROJECTOR_TYPES)}, got {kind!r}")
        self.kind = kind
        self.linear_1 = nn.Linear(vision_dim, lm_dim, bias=True)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(lm_dim, lm_dim, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(features.to(self.linear_1.weight.dtype))
        if self.kind == "mlp2x_gelu":
            x = self.linear_2(self.act(x))
        return x


def build_projector(cfg: ProjectorConfig, vision_dim: int, lm_dim: int) -> Projector:
    """A fresh projector (weights from `cfg.checkpoint` are loaded by `build_model`)."""
    return Projector(cfg.type, vision_dim, lm_dim)
