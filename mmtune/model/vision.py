"""Vision towers: patch features of one chosen layer, from open_clip or Hugging Face.

A tower maps pixel values [N, 3, H, W] to features [N, tokens, width] taken
from hidden state `feature_layer` (LLaVA-1.5 uses -2, the penultimate block),
keeping or dropping the CLS token (`select_strategy` "full" / "patch").

Both backends index hidden states the same way, the way Hugging Face's
`CLIPVisionModel(output_hidden_states=True)` does: index 0 is the embedding
output (patch + class + position embeddings, after the pre-layernorm), index
i is the output of block i, so there are `layers + 1` of them and -2 means
"the input of the last block" in either backend. For open_clip this module
runs the ViT itself (open_clip only exposes the pooled embedding or the last
layer's tokens) and stops after the block it needs.

Each tower also knows how its images must be preprocessed (size, mean, std)
and builds the PIL -> tensor transform, with LLaVA's optional pad-to-square.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from mmtune.config import VisionConfig
from mmtune.data.images import background_from_mean, expand_to_square
from mmtune.errors import MMTuneError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SELECT_STRATEGIES = ("patch", "full")

ImageTransform = Callable[[Any], torch.Tensor]


class VisionTower(nn.Module):
    """Common interface of the two backends (see module docstring)."""

    hidden_size: int
    num_layers: int  # transformer blocks; there are num_layers + 1 hidden states
    num_patches: int
    has_cls: bool
    image_mean: tuple[float, ...]

    def __init__(self, feature_layer: int, select_strategy: str) -> None:
        super().__init__()
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy

    # --------------------------------------------------------------- shapes
    def _check_selection(self) -> None:
        n = self.num_layers + 1
        if not -n <= self.feature_layer < n:
            raise MMTuneError(
                f"model.vision.feature_layer={self.feature_layer} is out of range: the tower has "
                f"{self.num_layers} blocks, so {n} hidden states (valid: {-n}..{n - 1})"
            )
        if self.select_strategy not in SELECT_STRATEGIES:
            raise MMTuneError(
                f"model.vision.select_strategy must be one of {', '.join(SELECT_STRATEGIES)}, "
                f"got {self.select_strategy!r}"
            )

    @property
    def layer_index(self) -> int:
        """`feature_layer` as a non-negative hidden-state index (0 = embeddings)."""
        return self.feature_layer % (self.num_layers + 1)

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image after selection: one per patch, plus CLS for 'full' when there is one."""
        return self.num_patches + (1 if self.select_strategy == "full" and self.has_cls else 0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # -------------------------------------------------------------- forward
    def hidden_states(self, pixel_values: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Hidden states 0..upto (all when None), [N, tokens, width] each."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.hidden_states(pixel_values.to(self.dtype), upto=self.layer_index)[self.layer_index]
        if self.has_cls and self.select_strategy == "patch":
            feats = feats[:, 1:]
        return feats

    # ---------------------------------------------------------- parameters
    def feature_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters the selected features depend on (what unfreezing the tower trains).

        Blocks after `feature_layer`, the final norm and any pooling head never
        receive a gradient; leaving them frozen keeps DDP from waiting on them.
        """
        raise NotImplementedError

    # ----------------------------------------------------------- transform
    def image_transform(self, pad_to_square: bool) -> ImageTransform:
        raise NotImplementedError


# --------------------------------------------------------------------------- #
# open_clip
# --------------------------------------------------------------------------- #


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
        self.image_mean = tuple(self.preprocess.get("mean", OPENAI_CLIP_MEAN))
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

    def image_transform(self, pad_to_square: bool) -> ImageTransform:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        known = {f.name for f in __import__("dataclasses").fields(PreprocessCfg)}
        cfg = PreprocessCfg(**{k: v for k, v in self.preprocess.items() if k in known})
        base = image_transform_v2(cfg, is_train=False)
        return _with_padding(base, pad_to_square, self.image_mean)


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
            "mean": OPENAI_CLIP_MEAN,
            "std": OPENAI_CLIP_STD,
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


# --------------------------------------------------------------------------- #
# Hugging Face (CLIPVisionModel / SiglipVisionModel)
# --------------------------------------------------------------------------- #


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

    def image_transform(self, pad_to_square: bool) -> ImageTransform:
        return _with_padding(
            HFImageTransform(_hf_image_processor(self.kind, self.processor_cfg)), pad_to_square, self.image_mean
        )


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
    from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

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


def check_open_clip_convertible(tower: OpenClipTower) -> None:
    """Name the first feature of this open_clip ViT that a plain `CLIPVisionModel` cannot express."""
    from open_clip.transformer import (
        LayerNorm,
        LayerNormFp32,
        QuickGELU,
        ResidualAttentionBlock,
    )

    v = tower.visual
    where = "open_clip tower"
    if getattr(v, "class_embedding", None) is None:
        raise MMTuneError(f"{where} has no class token; HF CLIPVisionModel always has one")
    if not isinstance(v.ln_pre, nn.LayerNorm):
        raise MMTuneError(f"{where} has no pre-layernorm (no_ln_pre); HF CLIPVisionModel always applies one")
    if v.conv1.bias is not None:
        raise MMTuneError(f"{where} has a patch-embedding bias; HF CLIPVisionModel's patch embedding has none")
    if v.grid_size[0] != v.grid_size[1] or v.patch_size[0] != v.patch_size[1]:
        raise MMTuneError(f"{where} has a non-square grid or patch; HF CLIPVisionModel needs square ones")
    norms = [v.ln_pre]
    acts = set()
    for i, blk in enumerate(v.transformer.resblocks):
        here = f"{where} block {i}"
        if type(blk) is not ResidualAttentionBlock:
            raise MMTuneError(
                f"{here} is a {type(blk).__name__} (qk-norm / scaled-cosine / extra-norm attention); "
                "only plain ResidualAttentionBlock ViTs convert to HF CLIPVisionModel"
            )
        if not (isinstance(blk.ls_1, nn.Identity) and isinstance(blk.ls_2, nn.Identity)):
            raise MMTuneError(f"{here} uses LayerScale, which HF CLIPVisionModel does not have")
        if hasattr(blk, "ln_1_kv"):
            raise MMTuneError(f"{here} is a cross-attention block")
        attn = blk.attn
        if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None or attn.in_proj_bias is None:
            raise MMTuneError(f"{here}: attention is not a biased nn.MultiheadAttention with packed q/k/v")
        if list(dict(blk.mlp.named_children())) != ["c_fc", "gelu", "c_proj"]:
            raise MMTuneError(f"{here}: MLP is not c_fc -> act -> c_proj")
        act = blk.mlp.gelu
        if isinstance(act, QuickGELU):
            acts.add("quick_gelu")
        elif isinstance(act, nn.GELU) and act.approximate == "none":
            acts.add("gelu")
        else:
            raise MMTuneError(f"{here}: activation {act!r} has no HF CLIP equivalent (gelu or quick_gelu)")
        norms += [blk.ln_1, blk.ln_2]
    if len(acts) > 1:
        raise MMTuneError(f"{where} mixes activations {sorted(acts)} across blocks")
    for norm in norms:
        if not isinstance(norm, LayerNorm | LayerNormFp32 | nn.LayerNorm) or not norm.elementwise_affine:
            raise MMTuneError(f"{where}: norm {type(norm).__name__} is not an affine LayerNorm")
    if len({n.eps for n in norms}) != 1:
        raise MMTuneError(f"{where}: its LayerNorms use different eps; HF CLIP has one layer_norm_eps")



def open_clip_to_hf_clip(tower: OpenClipTower) -> tuple[Any, dict[str, torch.Tensor]]:
    """A `CLIPVisionConfig` and `CLIPVisionModel` state dict holding the same ViT.

    Covers the plain open_clip ViT (learnable positions, CLS pooling, no
    layer scale / qk-norm / patch-embedding bias); anything else raises.
    Used for HF export and to check the two backends' hidden-state indexing.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    check_open_clip_convertible(tower)
    v = tower.visual
    blk0 = v.transformer.resblocks[0]
    act = blk0.mlp.gelu
    hidden_act = "quick_gelu" if type(act).__name__ == "QuickGELU" else "gelu"
    width = tower.hidden_size
    conf = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=blk0.mlp.c_fc.out_features,
        num_hidden_layers=tower.num_layers,
        num_attention_heads=blk0.attn.num_heads,
        image_size=v.image_size[0],
        patch_size=v.patch_size[0],
        hidden_act=hidden_act,
        layer_norm_eps=v.ln_pre.eps,
        projection_dim=v.output_dim,
    )
    sd: dict[str, torch.Tensor] = {
        "embeddings.class_embedding": v.class_embedding,
        "embeddings.patch_embedding.weight": v.conv1.weight,
        "embeddings.position_embedding.weight": v.positional_embedding,
        "pre_layrnorm.weight": v.ln_pre.weight,
        "pre_layrnorm.bias": v.ln_pre.bias,
        "post_layernorm.weight": v.ln_post.weight,
        "post_layernorm.bias": v.ln_post.bias,
    }
    for i, blk in enumerate(v.transformer.resblocks):
        p = f"encoder.layers.{i}."
        q, k, val = blk.attn.in_proj_weight.chunk(3, dim=0)
        qb, kb, vb = blk.attn.in_proj_bias.chunk(3, dim=0)
        sd.update(
            {
                p + "self_attn.q_proj.weight": q,
                p + "self_attn.q_proj.bias": qb,
                p + "self_attn.k_proj.weight": k,
                p + "self_attn.k_proj.bias": kb,
                p + "self_attn.v_proj.weight": val,
                p + "self_attn.v_proj.bias": vb,
                p + "self_attn.out_proj.weight": blk.attn.out_proj.weight,
                p + "self_attn.out_proj.bias": blk.attn.out_proj.bias,
                p + "layer_norm1.weight": blk.ln_1.weight,
                p + "layer_norm1.bias": blk.ln_1.bias,
                p + "layer_norm2.weight": blk.ln_2.weight,
                p + "layer_norm2.bias": blk.ln_2.bias,
                p + "mlp.fc1.weight": blk.mlp.c_fc.weight,
                p + "mlp.fc1.bias": blk.mlp.c_fc.bias,
                p + "mlp.fc2.weight": blk.mlp.c_proj.weight,
                p + "mlp.fc2.bias": blk.mlp.c_proj.bias,
            }
        )
    sd = {k: t.detach().clone().contiguous() for k, t in sd.items()}
    # Name the keys as this transformers version's CLIPVisionModel does (some nest them under vision_model.).
    with torch.device("meta"):
        expected = set(CLIPVisionModel(conf).state_dict())
    if not set(sd) <= expected:
        sd = {f"vision_model.{k}": t for k, t in sd.items()}
    return conf, sd


# --------------------------------------------------------------------------- #
# Shared
# --------------------------------------------------------------------------- #


# Transforms are classes, not closures, so DataLoader workers can pickle them.
class HFImageTransform:
    """PIL image -> [3, H, W] through a transformers image processor."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, img: Any) -> torch.Tensor:
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]


class PadToSquare:
    """LLaVA-1.5's 'pad' aspect ratio: pad with the normalization mean colour, then `base`."""

    def __init__(self, base: ImageTransform, mean: tuple[float, ...]) -> None:
        self.base = base
        self.fill = background_from_mean(mean)

    def __call__(self, img: Any) -> torch.Tensor:
        return self.base(expand_to_square(img if img.mode == "RGB" else img.convert("RGB"), self.fill))


def _with_padding(base: ImageTransform, pad_to_square: bool, mean: tuple[float, ...]) -> ImageTransform:
    return PadToSquare(base, mean) if pad_to_square else base


def build_vision_tower(
    cfg: VisionConfig, *, load_weights: bool = True, dtype: torch.dtype | None = None
) -> VisionTower:
    """The tower `cfg.backend` names ("open_clip" or "hf")."""
    if cfg.backend == "open_clip":
        tower: VisionTower = build_open_clip_tower(cfg, load_weights=load_weights)
        if dtype is not None:
            tower = tower.to(dtype)
        return tower
    if cfg.backend == "hf":
        return build_hf_tower(cfg, load_weights=load_weights, dtype=dtype)
    raise MMTuneError(f"model.vision.backend must be open_clip or hf, got {cfg.backend!r}")
