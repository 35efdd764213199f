"""Hugging Face towers (`model.vision.backend: hf`): transformers CLIPVisionModel / SiglipVisionModel."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mmtune.config import VisionConfig
from mmtune.errors import MMTuneError
from mmtune.model.towers.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageTransform,
    PixelNorm,
    VisionTower,
    _with_padding,
    register_tower,
)


@register_tower("hf")
class HFVisionTower(VisionTower):
    """A transformers CLIP or SigLIP vision model, read through `output_hidden_states`."""

    def __init__(
        self, model: nn.Module, processor_cfg: dict[str, Any], feature_layer: int, select_strategy: str
    ) -> None:
        super().__init__(feature_layer, select_strategy)
        self.model = model
        conf = model.config
        self.kind = "siglip" if "siglip" in conf.model_type else "clip"
        self.hidden_size = int(conf.hidden_size)
        self.num_layers = int(conf.num_hidden_layers)
        self.num_patches = (int(conf.image_size) // int(conf.patch_size)) ** 2
        self.has_cls = self.kind == "clip"
        self.processor_cfg = dict(processor_cfg)
        self.image_mean = tuple(self.processor_cfg["image_mean"])
        self.pixel_norm = _pixel_norm(_hf_image_processor(self.kind, self.processor_cfg))
        self._check_selection()

    def hidden_states(self, pixel_values: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return list(out.hidden_states)

    def _layers(self) -> nn.ModuleList:
        core = getattr(self.model, "vision_model", self.model)
        return core.encoder.layers

    def feature_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        layers = self._layers()
        unused = {id(p) for layer in list(layers)[self.layer_index :] for p in layer.parameters()}
        core = getattr(self.model, "vision_model", self.model)
        for head_name in ("post_layernorm", "head"):
            head = getattr(core, head_name, None)
            if isinstance(head, nn.Module):
                unused |= {id(p) for p in head.parameters()}
        for name, p in self.named_parameters():
            if id(p) not in unused:
                yield name, p

    def image_transform(self, pad_to_square: bool, *, normalize: bool = True) -> ImageTransform:
        # normalize=False: the processor resizes and crops only, and pixel_norm finishes its work on the device
        # (fast processors; a PIL-backend processor has no pixel_norm and always normalises here).
        raw = not normalize and self.pixel_norm is not None
        return _with_padding(
            HFImageTransform(_hf_image_processor(self.kind, self.processor_cfg), raw=raw), pad_to_square,
            self.image_mean,
        )


    @classmethod
    def build(cls, cfg: VisionConfig, *, load_weights: bool = True, dtype: torch.dtype | None = None) -> VisionTower:
        return build_hf_tower(cfg, load_weights=load_weights, dtype=dtype)

    @property
    def patch_size(self) -> int:
        return int(self.model.config.patch_size)

    def to_hf(self) -> tuple[Any, dict[str, torch.Tensor]]:
        # Already a transformers vision model: its own config and (shared) tensors.
        return copy.deepcopy(self.model.config), dict(self.model.state_dict())

    def hf_model_class(self) -> type[nn.Module]:
        return type(self.model)

    def hf_processor_kwargs(self) -> dict[str, Any]:
        proc = _hf_image_processor(self.kind, self.processor_cfg)
        kwargs: dict[str, Any] = {}
        for key in (
            "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb",
        ):
            value = getattr(proc, key, None)
            if value is None:
                continue
            if hasattr(value, "keys"):
                value = {k: v for k, v in dict(value).items() if v is not None}
            elif hasattr(value, "value"):  # an enum (resample)
                value = int(value.value)
            elif isinstance(value, tuple):
                value = list(value)
            kwargs[key] = value
        kwargs.setdefault("do_center_crop", False)
        return kwargs


def _hf_image_processor(kind: str, cfg: dict[str, Any]) -> Any:
    """The tower family's image processor; `cfg["_backend"] == "pil"` picks the PIL implementation."""
    import transformers
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    cls = SiglipImageProcessor if kind == "siglip" else CLIPImageProcessor
    if cfg.get("_backend") == "pil":
        cls = getattr(transformers, cls.__name__ + "Pil", cls)
    return cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})


def build_hf_tower(cfg: VisionConfig, *, load_weights: bool = True, dtype: torch.dtype | None = None) -> HFVisionTower:
    """CLIPVisionModel / SiglipVisionModel from a folder or hub id, or random from `cfg.config` kwargs.

    `cfg.config` may name `model_type: siglip_vision_model` (default: clip_vision_model).
    The image processor settings come from the folder's preprocessor_config.json
    when there is one, else from the tower's image size and the family's mean/std.
    """
    from transformers import (
        AutoConfig,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    processor_cfg: dict[str, Any] | None = None
    if cfg.config:
        kwargs = dict(cfg.config)
        model_type = str(kwargs.pop("model_type", "clip_vision_model"))
        if "siglip" in model_type:
            conf_cls, model_cls = SiglipVisionConfig, SiglipVisionModel
        elif "clip" in model_type:
            conf_cls, model_cls = CLIPVisionConfig, CLIPVisionModel
        else:
            raise MMTuneError(
                f"model.vision.config.model_type {model_type!r}: "
                "the hf backend takes clip_vision_model or siglip_vision_model"
            )
        try:
            model = model_cls(conf_cls(**kwargs))
        except (TypeError, ValueError) as exc:
            raise MMTuneError(f"model.vision.config: {exc}") from None
    elif cfg.model_name:
        try:
            conf = AutoConfig.from_pretrained(cfg.model_name)
        except (OSError, ValueError) as exc:
            raise MMTuneError(
                f"cannot load vision tower config {cfg.model_name!r}: {str(exc).splitlines()[0]}"
            ) from None
        model_type = conf.model_type
        if "siglip" in model_type:
            model_cls, conf_cls = SiglipVisionModel, SiglipVisionConfig
        elif "clip" in model_type:
            model_cls, conf_cls = CLIPVisionModel, CLIPVisionConfig
        else:
            raise MMTuneError(f"vision tower {cfg.model_name!r} is a {model_type!r}; hf backend takes CLIP or SigLIP")
        if load_weights:
            try:
                model = model_cls.from_pretrained(cfg.model_name, dtype=dtype)
            except (OSError, ValueError) as exc:
                raise MMTuneError(f"cannot load vision tower {cfg.model_name!r}: {str(exc).splitlines()[0]}") from None
        else:
            vconf = getattr(conf, "vision_config", conf)
            model = model_cls(vconf if isinstance(vconf, conf_cls) else conf_cls(**vconf.to_dict()))
        processor_cfg = _pretrained_processor_cfg(cfg.model_name)
    else:
        raise MMTuneError("model.vision (hf) needs model_name (folder or hub id) or config (vision config kwargs)")
    if dtype is not None:
        model = model.to(dtype)
    conf = model.config
    kind = "siglip" if "siglip" in conf.model_type else "clip"
    if processor_cfg is None:
        size = int(conf.image_size)
        if kind == "siglip":
            processor_cfg = {"size": {"height": size, "width": size}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        else:
            processor_cfg = {
                "size": {"shortest_edge": size},
                "crop_size": {"height": size, "width": size},
                "image_mean": list(OPENAI_CLIP_MEAN),
                "image_std": list(OPENAI_CLIP_STD),
            }
    return HFVisionTower(model, processor_cfg, cfg.feature_layer, cfg.select_strategy)


def _pretrained_processor_cfg(name: str) -> dict[str, Any] | None:
    """The image processor settings saved next to a pretrained tower, if any."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        return None
    keep = (
        "size",
        "crop_size",
        "image_mean",
        "image_std",
        "do_center_crop",
        "do_resize",
        "resample",
        "do_normalize",
        "do_rescale",
        "rescale_factor",
        "do_convert_rgb",
    )
    out = {}
    for k in keep:
        v = getattr(proc, k, None)
        if v is not None:
            out[k] = dict(v) if hasattr(v, "keys") else v
    return out


# Transforms are classes, not closures, so DataLoader workers can pickle them.
class HFImageTransform:
    """PIL image -> [3, H, W] through a transformers image processor (`raw`: uint8, before rescale + normalise)."""

    def __init__(self, processor: Any, raw: bool = False) -> None:
        self.processor, self.raw = processor, raw

    def __call__(self, img: Any) -> torch.Tensor:
        extra = {"do_rescale": False, "do_normalize": False} if self.raw else {}
        out = self.processor(images=img, return_tensors="pt", **extra)["pixel_values"][0]
        if self.raw and out.dtype != torch.uint8:
            raise MMTuneError(f"{type(self.processor).__name__} gave {out.dtype} pixels without rescaling, not uint8")
        return out


def _pixel_norm(processor: Any) -> PixelNorm | None:
    """The device-side rescale + normalise of a fast (torch) image processor that does both, else None.

    Fast processors fuse the two steps (`_fuse_mean_std_and_rescale_factor`); PixelNorm does the same
    arithmetic. PIL-backend processors compute in numpy, so their towers keep normalising on the CPU.
    """
    if not hasattr(processor, "_fuse_mean_std_and_rescale_factor"):
        return None
    if not (processor.do_rescale and processor.do_normalize):
        return None
    mean, std = processor.image_mean, processor.image_std
    mean = tuple(mean) if isinstance(mean, list | tuple) else (float(mean),) * 3
    std = tuple(std) if isinstance(std, list | tuple) else (float(std),) * 3
    return PixelNorm(mean, std, rescale_factor=float(processor.rescale_factor))
