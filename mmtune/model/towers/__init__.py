"""Vision towers behind a registry: `model.vision.backend` -> a VisionTower class (see base.py).

One module per backend: open_clip_tower.py (open_clip ViTs), hf_tower.py
(transformers CLIP / SigLIP). Importing this package registers them.
"""

from __future__ import annotations

import difflib

import torch

from mmtune.config import VisionConfig
from mmtune.errors import MMTuneError
from mmtune.model.towers.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SELECT_STRATEGIES,
    TOWERS,
    ImageTransform,
    PadToSquare,
    VisionTower,
    register_tower,
)
from mmtune.model.towers.hf_tower import HFImageTransform, HFVisionTower, build_hf_tower
from mmtune.model.towers.open_clip_tower import OpenClipTower, build_open_clip_tower


def build_vision_tower(
    cfg: VisionConfig, *, load_weights: bool = True, dtype: torch.dtype | None = None
) -> VisionTower:
    """The tower `cfg.backend` names (a key of TOWERS)."""
    cls = TOWERS.get(cfg.backend)
    if cls is None:
        close = difflib.get_close_matches(str(cfg.backend), list(TOWERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise MMTuneError(f"model.vision.backend {cfg.backend!r} is not registered{hint} (have: {', '.join(TOWERS)})")
    return cls.build(cfg, load_weights=load_weights, dtype=dtype)


__all__ = [
    "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "SELECT_STRATEGIES", "TOWERS", "HFImageTransform", "HFVisionTower",
    "ImageTransform", "OpenClipTower", "PadToSquare", "VisionTower", "build_hf_tower", "build_open_clip_tower",
    "build_vision_tower", "register_tower",
]
