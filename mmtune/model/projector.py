"""Projectors: vision features -> LM embedding space.

Named and laid out like transformers' `LlavaMultiModalProjector`
(`linear_1`, `act`, `linear_2`), so exporting to HF LLaVA is a renaming.
Weights from LLaVA's own `mm_projector.bin` (`model.mm_projector.{0,2}.*`)
are renamed onto these modules by `from_llava_projector_state`.
"""

from __future__ import annotations

from typing import Any

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
        x = self.linear_1(features.to(self.linear_1.weight.dtype))  # [B, N, D_vision] -> [B, N, D_lm]
        if self.kind == "mlp2x_gelu":
            x = self.linear_2(self.act(x))  # [B, N, D_lm]
        # nn.Linear on a 3-D input returns a view of its 2-D result. Under FSDP2 the projector is a sharded
        # unit whose output carries the hook that all-gathers its weights for backward, and an in-place op on
        # a view drops that hook (torch warns on every step). A fresh tensor costs one copy of B x N x D_lm.
        return x.clone() if x._is_view() else x


# LLaVA's `mm_projector` is an nn.Sequential: index 0 = Linear, 1 = GELU, 2 = Linear
# (mlp2x_gelu), or a bare nn.Linear (linear). Its checkpoints name the keys
# `model.mm_projector.<index>.<param>` (some forks drop the `model.` prefix).
_LLAVA_PREFIXES = ("model.mm_projector.", "mm_projector.", "base_model.model.model.mm_projector.")
_LLAVA_INDEX = {"0": "linear_1", "2": "linear_2"}


def is_llava_projector_state(state: dict[str, Any]) -> bool:
    return any(k.startswith(_LLAVA_PREFIXES) for k in state)


def from_llava_projector_state(state: dict[str, torch.Tensor], kind: str, where: str) -> dict[str, torch.Tensor]:
    """LLaVA's `mm_projector.bin` keys -> this module's names (`linear_1`, `linear_2`); errors name `where`."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = next((p for p in _LLAVA_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise MMTuneError(f"{where}: key {key!r} is not an mm_projector weight")
        rest = key[len(prefix):]
        if kind == "linear" and rest in ("weight", "bias"):
            out[f"linear_1.{rest}"] = value
            continue
        index, _, param = rest.partition(".")
        if kind != "mlp2x_gelu" or index not in _LLAVA_INDEX or param not in ("weight", "bias"):
            raise MMTuneError(f"{where}: key {key!r} does not fit model.projector.type={kind!r}")
        out[f"{_LLAVA_INDEX[index]}.{param}"] = value
    return out


def build_projector(cfg: ProjectorConfig, vision_dim: int, lm_dim: int) -> Projector:
    """A fresh projector (weights from `cfg.checkpoint` are loaded by `build_model`)."""
    return Projector(cfg.type, vision_dim, lm_dim)
