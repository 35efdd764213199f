"""Vision towers behind a registry: backend id -> class, and export asks the tower what it is."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
import torch
from helpers import HF_CLIP, TINY_VIT

from mmtune.config import VisionBackend, VisionConfig
from mmtune.errors import MMTuneError
from mmtune.model import export
from mmtune.model.towers import (
    TOWERS,
    HFVisionTower,
    OpenClipTower,
    VisionTower,
    build_vision_tower,
    register_tower,
)

REPO = Path(__file__).resolve().parents[1]


def test_registry_holds_one_class_per_backend_and_matches_the_config_choices():
    assert TOWERS == {"open_clip": OpenClipTower, "hf": HFVisionTower}
    assert set(typing.get_args(VisionBackend)) == set(TOWERS)
    assert {cls.__module__ for cls in TOWERS.values()} == {
        "mmtune.model.towers.open_clip_tower", "mmtune.model.towers.hf_tower"}


def test_a_new_backend_needs_no_edit_of_the_builder():
    @register_tower("test_identity")
    class Identity(VisionTower):
        hidden_size, num_layers, num_patches, has_cls, image_mean = 4, 1, 1, False, (0.5,)

        @classmethod
        def build(cls, cfg, *, load_weights=True, dtype=None):
            tower = cls(cfg.feature_layer, cfg.select_strategy)
            tower.proj = torch.nn.Linear(4, 4)
            return tower

    try:
        tower = build_vision_tower(VisionConfig(backend="test_identity"))  # type: ignore[arg-type]
        assert isinstance(tower, Identity) and tower.backend == "test_identity"
        with pytest.raises(MMTuneError, match="has no Hugging Face equivalent"):
            tower.to_hf()
        with pytest.raises(ValueError, match="registered twice"):
            register_tower("test_identity")(Identity)
    finally:
        TOWERS.pop("test_identity", None)
    with pytest.raises(MMTuneError, match=r"'open_clp' is not registered; did you mean 'open_clip'\?"):
        build_vision_tower(VisionConfig(backend="open_clp"))  # type: ignore[arg-type]


def test_each_tower_answers_exports_questions():
    torch.manual_seed(0)
    oc = build_vision_tower(VisionConfig(backend="open_clip", config=TINY_VIT))
    assert oc.patch_size == 8 and oc.image_backend == "pil" and oc.converted_for_hf
    kw = oc.hf_processor_kwargs()
    assert kw["resample"] == 3 and kw["size"] == {"shortest_edge": 32} and "do_pad" not in kw
    conf, state = oc.to_hf()
    assert conf.model_type == "clip_vision_model" and conf.patch_size == 8 and state

    hf = build_vision_tower(VisionConfig(backend="hf", config=HF_CLIP))
    assert hf.image_backend == "torchvision" and not hf.converted_for_hf
    assert hf.patch_size == HF_CLIP["patch_size"]
    conf, state = hf.to_hf()
    assert conf.hidden_size == HF_CLIP["hidden_size"] and hf.hf_model_class() is type(hf.model)
    assert export.image_processor_kwargs(hf, True)["do_pad"] is True


def test_export_asks_the_tower_instead_of_checking_its_type():
    src = inspect.getsource(export)
    for name in ("OpenClipTower", "HFVisionTower", "open_clip_to_hf_clip"):
        assert name not in src, name
    assert "isinstance(tower" not in src


def test_export_only_conversion_code_left_vision_py():
    from mmtune.model.vision import open_clip_to_hf_clip

    assert open_clip_to_hf_clip.__module__ == "mmtune.model.towers.open_clip_convert"
    vision_src = (REPO / "mmtune" / "model" / "vision.py").read_text(encoding="utf-8")
    assert "def " not in vision_src and "class " not in vision_src  # only the old import path remains
