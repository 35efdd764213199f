"""open_clip ViT towers (`model.vision.backend: open_clip`), run block by block to collect hidden states.

open_clip only exposes the pooled embedding or the last layer's tokens, so this
module runs the ViT itself and stops after the block it needs. Export converts
it to a transformers `CLIPVisionModel` (mmtune/model/towers/open_clip_convert.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mmtune.config import VisionConfig
from mmtune.errors import MMTuneError
from mmtune.model.towers import base as tower_base
from mmtune.model.towers.base import VisionTower, register_tower

# open_clip interpolation names -> PIL resample ids (LlavaImageProcessor's `resample`).
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}


@register_tower("open_clip")
class OpenClipTower(VisionTower):
    """An open_clip `VisionTransformer`, run block by block to collect hidden states."""

    def __init__(self, visual: nn.Module, preprocess: dict[str, Any], feature_layer: int, select_strategy: str) -> None:
        super().__init__(feature_layer, select_strategy)
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise MMTuneError(
                f"open_clip tower {type(visual).__name__} is not a ViT; mmtune takes patch tokens from "
                "open_clip VisionTransformer towers only (use backend: hf for others)"
            )
        self.visual = visual
        self.preprocess = dict(preprocess)
        self.hidden_size = int(visual.conv1.out_channels)
        self.num_layers = len(visual.transformer.resblocks)
        self.num_patches = int(visual.grid_size[0] * visual.grid_size[1])
        self.has_cls = True
        self.image_mean = tuple(self.preprocess.get("mean", tower_base.OPENAI_CLIP_MEAN))
        self.pixel_norm = self._split_transform()[1]
        self._check_selection()

    def embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch embedding + class token + positions + ln_pre: hidden state 0.

        Written out rather than calling open_clip's private `_embeds`, and without
        patch dropout, which would drop patch tokens LLaVA needs in order.
        """
        v = self.visual
        x = v.conv1(pixel_values)  # [N, width, gh, gw]
        x = x.flatten(2).transpose(1, 2)  # [N, gh*gw, width]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(x)

    def hidden_states(self, pixel_values: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        blocks = self.visual.transformer.resblocks
        upto = self.num_layers if upto is None else upto
        x = self.embeddings(pixel_values)
        states = [x]
        batch_first = getattr(self.visual.transformer, "batch_first", True)
        for blk in blocks[:upto]:
            if batch_first:
                x = blk(x)
            else:  # older open_clip runs blocks sequence-first
                x = blk(x.transpose(0, 1)).transpose(0, 1)
            states.append(x)
        return states

    def feature_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        v = self.visual
        used: list[tuple[str, nn.Module | nn.Parameter]] = [
            ("visual.conv1", v.conv1),
            ("visual.class_embedding", v.class_embedding),
            ("visual.positional_embedding", v.positional_embedding),
            ("visual.ln_pre", v.ln_pre),
        ]
        used += [(f"visual.transformer.resblocks.{i}", v.transformer.resblocks[i]) for i in range(self.layer_index)]
        for name, item in used:
            if isinstance(item, nn.Parameter):
                yield name, item
            else:
                for sub, p in item.named_parameters():
                    yield f"{name}.{sub}", p

    def open_clip_transform(self) -> Any:
        """open_clip's own eval transform for this tower (PIL -> normalised float tensor)."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        known = {f.name for f in dataclasses.fields(PreprocessCfg)}
        cfg = PreprocessCfg(**{k: v for k, v in self.preprocess.items() if k in known})
        return image_transform_v2(cfg, is_train=False)

    def _split_transform(self) -> tuple[Any, tower_base.PixelNorm]:
        """open_clip's transform is [PIL steps..., (Maybe)ToTensor, Normalize]: the PIL steps run in the
        loader (uint8 out); ToTensor + Normalize become `pixel_norm`, with the constants open_clip uses."""
        from torchvision.transforms import Compose, Normalize, ToTensor

        full = self.open_clip_transform()
        steps = list(full.transforms)
        cut = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
        tail = steps[cut + 1:] if cut is not None else []
        if cut is None or len(tail) != 1 or not isinstance(tail[0], Normalize):
            raise MMTuneError(f"unexpected open_clip transform {full} (expected PIL steps, ToTensor, Normalize)")
        return Compose(steps[:cut]), tower_base.PixelNorm(tuple(tail[0].mean), tuple(tail[0].std))

    def image_transform(self, pad_to_square: bool, *, normalize: bool = True) -> tower_base.ImageTransform:
        steps, norm = self._split_transform()
        fused = tower_base.fuse_pad_resize(steps, self.image_mean) if pad_to_square else None
        raw = tower_base.RawPixels(fused or steps)
        base = tower_base.Normalized(raw, norm) if normalize else raw
        return base if fused is not None else tower_base._with_padding(base, pad_to_square, self.image_mean)

    # open_clip resizes with PIL, so the PIL backend of transformers' processors matches it.
    image_backend = "pil"
    converted_for_hf = True

    @classmethod
    def build(cls, cfg: VisionConfig, *, load_weights: bool = True, dtype: torch.dtype | None = None) -> VisionTower:
        tower = build_open_clip_tower(cfg, load_weights=load_weights)
        return tower.to(dtype) if dtype is not None else tower

    @property
    def patch_size(self) -> int:
        return int(self.visual.patch_size[0])

    def to_hf(self) -> tuple[Any, dict[str, torch.Tensor]]:
        from mmtune.model.towers.open_clip_convert import open_clip_to_hf_clip

        return open_clip_to_hf_clip(self)

    def hf_model_class(self) -> type[nn.Module]:
        from transformers import CLIPVisionModel

        return CLIPVisionModel

    def hf_processor_kwargs(self) -> dict[str, Any]:
        pre = self.preprocess
        size = pre.get("size", self.visual.image_size)
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        mode = pre.get("resize_mode", "shortest")
        interp = str(pre.get("interpolation", "bicubic"))
        if interp not in _RESAMPLE:
            raise MMTuneError(f"open_clip interpolation {interp!r} has no PIL equivalent")
        kwargs: dict[str, Any] = {
            "do_resize": True,
            "resample": _RESAMPLE[interp],
            "image_mean": [float(x) for x in pre.get("mean", self.image_mean)],
            "image_std": [float(x) for x in pre["std"]],
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
        }
        if mode == "shortest":
            if h != w:
                raise MMTuneError(f"open_clip resize_mode 'shortest' with a non-square size {(h, w)}")
            kwargs.update(size={"shortest_edge": h}, do_center_crop=True, crop_size={"height": h, "width": w})
        elif mode == "squash":
            kwargs.update(size={"height": h, "width": w}, do_center_crop=False)
        else:
            raise MMTuneError(f"open_clip resize_mode {mode!r} has no LlavaImageProcessor equivalent")
        return kwargs


def build_open_clip_tower(cfg: VisionConfig, *, load_weights: bool = True) -> OpenClipTower:
    """An open_clip ViT: named model (+ pretrained tag or checkpoint path) or random from `cfg.config`.

    `cfg.config` is an open_clip model config dict ({"embed_dim", "vision_cfg", ...},
    the same shape as open_clip's model_configs/*.json; only the vision part is built).
    """
    import open_clip

    if cfg.config:
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        conf = dict(cfg.config)
        vision_cfg = conf.get("vision_cfg")
        if not isinstance(vision_cfg, dict):
            raise MMTuneError(
                "model.vision.config (open_clip) needs a 'vision_cfg' mapping, as in open_clip's model configs"
            )
        try:
            vcfg = CLIPVisionCfg(**vision_cfg)
        except TypeError as exc:
            raise MMTuneError(f"model.vision.config.vision_cfg: {exc}") from None
        # open_clip's own factory for the image tower; the text tower is never built.
        visual = _build_vision_tower(int(conf.get("embed_dim", vcfg.width)), vcfg, bool(conf.get("quick_gelu", False)))
        size = vcfg.image_size
        preprocess = {
            "size": size,
            "mean": tower_base.OPENAI_CLIP_MEAN,
            "std": tower_base.OPENAI_CLIP_STD,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        }
        preprocess.update(conf.get("preprocess_cfg") or {})
        if cfg.pretrained:
            _load_open_clip_checkpoint(visual, cfg.pretrained)
    elif cfg.model_name:
        pretrained = cfg.pretrained if load_weights else None
        try:
            model = open_clip.create_model(cfg.model_name, pretrained=pretrained)
        except (RuntimeError, OSError, ValueError) as exc:
            detail = " ".join(str(exc).split())
            detail = detail if len(detail) <= 300 else detail[:300] + " ..."
            raise MMTuneError(
                f"cannot build open_clip model {cfg.model_name!r} (pretrained={pretrained!r}): {detail}"
            ) from None
        preprocess = dict(open_clip.get_model_preprocess_cfg(model))
        visual = model.visual
    else:
        raise MMTuneError("model.vision needs model_name (open_clip model name) or config (open_clip model cfg dict)")
    return OpenClipTower(visual, preprocess, cfg.feature_layer, cfg.select_strategy)


def _load_open_clip_checkpoint(visual: nn.Module, path: str) -> None:
    """Vision weights from a full open_clip checkpoint (keys `visual.*`) into a config-built tower."""
    from safetensors.torch import load_file

    try:
        sd = (
            load_file(path)
            if path.endswith(".safetensors")
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    except (OSError, RuntimeError) as exc:
        raise MMTuneError(f"cannot read vision checkpoint {path}: {str(exc).splitlines()[0]}") from None
    sd = sd.get("state_dict", sd)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    vis = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")} or sd
    missing, unexpected = visual.load_state_dict(vis, strict=False)
    if missing:
        raise MMTuneError(f"vision checkpoint {path} lacks {len(missing)} tower weights, e.g. {missing[0]}")
