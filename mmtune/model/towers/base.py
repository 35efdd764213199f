"""The vision-tower interface and its registry (backend id -> class, as prismatic keeps its backbones).

A tower maps pixel values [N, 3, H, W] to features [N, tokens, width] taken
from hidden state `feature_layer` (LLaVA-1.5 uses -2, the penultimate block),
keeping or dropping the CLS token (`select_strategy` "full" / "patch").

Every backend indexes hidden states the same way, the way Hugging Face's
`CLIPVisionModel(output_hidden_states=True)` does: index 0 is the embedding
output (patch + class + position embeddings, after the pre-layernorm), index
i is the output of block i, so there are `layers + 1` of them and -2 means
"the input of the last block" in any backend.

Each tower also knows how its images must be preprocessed (size, mean, std),
builds the PIL -> tensor transform (with LLaVA's optional pad-to-square), and
tells export what it is in Hugging Face terms (`to_hf`, `hf_processor_kwargs`,
`patch_size`, `image_backend`), so export never checks a tower's type.

Pixels. A tower with a `pixel_norm` (open_clip towers; HF towers with a fast
image processor) splits its transform:
the PIL steps (pad, resize, crop) give uint8 pixels [3, H, W]
(`image_transform(..., normalize=False)`: what the training loader ships,
4x smaller than float32 and with no float work on the CPU), and the tower
normalises uint8 input itself at the start of `forward`, on whatever device
it runs on. `pixel_norm` holds the one copy of the mean/std constants and
does torchvision's ToTensor + Normalize arithmetic step by step, so the
normalised pixels are bit-identical to the CPU transform they replace
(tests/test_model.py checks this against open_clip's own transform).
Floating-point pixel_values are taken as already normalised (the default
`image_transform(pad_to_square)`, HF processors, towers without a pixel_norm).
`tests/test_pixels.py` checks the HF towers against their processor too.

Adding a backend: one module in mmtune/model/towers/ with a `VisionTower`
subclass decorated `@register_tower("id")` that implements `build` and the
hooks below; import it in mmtune/model/towers/__init__.py and add the id to
`VisionBackend` in mmtune/config.py (a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from mmtune.config import VisionConfig
from mmtune.data.images import background_from_mean, expand_to_square, pad_resize
from mmtune.errors import MMTuneError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SELECT_STRATEGIES = ("patch", "full")

ImageTransform = Callable[[Any], torch.Tensor]

TOWERS: dict[str, type[VisionTower]] = {}


def register_tower(name: str) -> Callable[[type[VisionTower]], type[VisionTower]]:
    """Class decorator: make a VisionTower subclass the backend `model.vision.backend: NAME` builds."""

    def add(cls: type[VisionTower]) -> type[VisionTower]:
        if name in TOWERS:
            raise ValueError(f"vision backend {name!r} is registered twice")
        cls.backend = name
        TOWERS[name] = cls
        return cls

    return add


class VisionTower(nn.Module):
    """Common interface of the two backends (see module docstring)."""

    hidden_size: int
    num_layers: int  # transformer blocks; there are num_layers + 1 hidden states
    num_patches: int
    has_cls: bool
    image_mean: tuple[float, ...]
    # uint8 -> normalised float32 (see module docstring); None: the transform normalises on the CPU.
    pixel_norm: PixelNorm | None = None

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
        if pixel_values.dtype == torch.uint8:  # raw pixels from the loader: normalised here, on the device
            if self.pixel_norm is None:
                raise MMTuneError(f"{type(self).__name__} got uint8 pixel_values but normalises on the CPU; "
                                  "pass its image_transform's (normalised) output")
            pixel_values = self.pixel_norm(pixel_values)
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
    def image_transform(self, pad_to_square: bool, *, normalize: bool = True) -> ImageTransform:
        """PIL image -> [3, H, W] tensor this tower takes.

        `normalize=False`: uint8 pixels that `forward` normalises (towers with a
        `pixel_norm`; the others return their normalised float transform anyway).
        """
        raise NotImplementedError

    # ------------------------------------------------------ building, export
    backend: ClassVar[str] = ""
    # True when `to_hf` converts weights into another architecture (export then checks the features).
    converted_for_hf: ClassVar[bool] = False
    # The `AutoProcessor.from_pretrained(..., backend=...)` that reproduces this tower's pixels exactly.
    image_backend: ClassVar[str] = "torchvision"

    @classmethod
    def build(cls, cfg: VisionConfig, *, load_weights: bool = True, dtype: torch.dtype | None = None) -> VisionTower:
        """The tower `cfg` describes (`load_weights=False`: the architecture only, weights come later)."""
        raise NotImplementedError

    @property
    def patch_size(self) -> int:
        raise NotImplementedError

    def to_hf(self) -> tuple[Any, dict[str, torch.Tensor]]:
        """A transformers vision config + that model's state dict holding this tower (tensors may be shared)."""
        raise MMTuneError(f"vision tower {type(self).__name__} has no Hugging Face equivalent")

    def hf_model_class(self) -> type[nn.Module]:
        """The transformers class `to_hf()`'s config and weights load into."""
        raise NotImplementedError

    def hf_processor_kwargs(self) -> dict[str, Any]:
        """`LlavaImageProcessor` settings equivalent to `image_transform(pad_to_square=False)`."""
        raise MMTuneError(f"vision tower {type(self).__name__} has no Hugging Face image processor")


class PixelNorm:
    """uint8 RGB pixels [..., 3, H, W] -> the tower's normalised float32 input, on the tensor's own device.

    Two arithmetics, each the one of the CPU transform it replaces, so the
    result equals it bit for bit:
    * `rescale_factor=None` (open_clip towers): torchvision's `to_tensor` then
      `Normalize`, `(x / 255 - mean) / std`, step by step in float32;
    * `rescale_factor=r` (transformers' fast image processors, HF towers): their
      fused rescale + normalise, `(x - mean * (1 / r)) / (std * (1 / r))`, the
      scaled constants computed as transformers computes them.
    Each division is by a tensor on `x`'s device: CUDA turns division by a CPU
    scalar into a multiplication by its reciprocal, which can differ in the
    last bit. The constants are plain attributes, not module buffers, so
    casting the tower to bf16 never rounds them.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], rescale_factor: float | None = None) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise MMTuneError(f"pixel normalisation needs 3 channel means and stds, got {mean} / {std}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.rescale_factor = None if rescale_factor is None else float(rescale_factor)
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def __getstate__(self) -> dict[str, Any]:  # pickled into DataLoader workers: no device tensors
        return {**self.__dict__, "_on": {}}

    def _key(self) -> tuple[Any, ...]:
        return self.mean, self.std, self.rescale_factor

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PixelNorm) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"PixelNorm(mean={self.mean}, std={self.std}, rescale_factor={self.rescale_factor})"

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._on:
            mean, std = torch.tensor(self.mean), torch.tensor(self.std)  # float32, as both transforms make them
            if self.rescale_factor is None:
                consts: tuple[torch.Tensor, ...] = (torch.tensor(255.0), mean, std)
            else:
                consts = (mean * (1.0 / self.rescale_factor), std * (1.0 / self.rescale_factor))
            self._on[device] = tuple(c.to(device).view(-1, 1, 1) if c.ndim else c.to(device) for c in consts)
        return self._on[device]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8 or pixels.ndim < 3 or pixels.shape[-3] != 3:
            raise MMTuneError(f"expected uint8 pixels [..., 3, H, W], got {pixels.dtype} {tuple(pixels.shape)}")
        # contiguous: a loader batch is channels-last uint8 (collate.stack_images); the model gets NCHW floats
        x = pixels.to(torch.float32, memory_format=torch.contiguous_format)
        if self.rescale_factor is None:
            scale, mean, std = self._constants(pixels.device)
            return x.div(scale).sub(mean).div(std)
        mean, std = self._constants(pixels.device)
        return x.sub(mean).div(std)


# Transforms are classes, not closures, so DataLoader workers can pickle them.
class RawPixels:
    """PIL image -> uint8 [3, H, W]: the PIL steps of a tower's transform (resize, crop), then the bytes as a tensor."""

    def __init__(self, steps: Callable[[Any], Any]) -> None:
        self.steps = steps

    def __call__(self, img: Any) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        out = self.steps(img)
        if out.mode != "RGB":
            raise MMTuneError(f"the tower's PIL steps gave a {out.mode} image, expected RGB")
        return pil_to_tensor(out)  # a [3, H, W] view of the HWC bytes; collation's stack copies it once


class Normalized:
    """`raw` then `norm` on the CPU: the float transform for callers that need normalised pixels up front."""

    def __init__(self, raw: ImageTransform, norm: PixelNorm) -> None:
        self.raw, self.norm = raw, norm

    def __call__(self, img: Any) -> torch.Tensor:
        return self.norm(self.raw(img))


class PadToSquare:
    """LLaVA-1.5's 'pad' aspect ratio: pad with the normalization mean colour, then `base`."""

    def __init__(self, base: ImageTransform, mean: tuple[float, ...]) -> None:
        self.base = base
        self.fill = background_from_mean(mean)

    def __call__(self, img: Any) -> torch.Tensor:
        return self.base(expand_to_square(img if img.mode == "RGB" else img.convert("RGB"), self.fill))


class PadResize:
    """PIL step: LLaVA's pad to square with `fill`, then a resize to size x size (`pad_resize`: same pixels, less work)."""

    def __init__(self, fill: tuple[int, int, int], size: int, resample: int) -> None:
        self.fill, self.size, self.resample = fill, size, resample

    def __call__(self, img: Any) -> Any:
        return pad_resize(img if img.mode == "RGB" else img.convert("RGB"), self.fill, self.size, self.resample)


def fuse_pad_resize(steps: Any, mean: tuple[float, ...]) -> Any | None:
    """torchvision PIL steps starting with a `Resize` that makes a square image size x size, preceded by
    pad-to-square, as one `PadResize` + the remaining steps; None when the first step is not such a Resize."""
    from torchvision.transforms import CenterCrop, Compose, Resize
    from torchvision.transforms.functional import pil_modes_mapping

    first = steps.transforms[0] if isinstance(steps, Compose) and steps.transforms else None
    if not isinstance(first, Resize) or first.max_size is not None or first.interpolation not in pil_modes_mapping:
        return None
    side = _square(first.size)
    if side is None:
        return None
    step = PadResize(background_from_mean(mean), side, pil_modes_mapping[first.interpolation])
    # PadResize makes a side x side image, so a CenterCrop to that size after it would only copy it
    rest = [t for t in steps.transforms[1:] if not (isinstance(t, CenterCrop) and _square(t.size) == side)]
    return Compose([step, *rest])


def _square(size: Any) -> int | None:
    """The side of a torchvision size (int, [s] or [s, s]) that is a square; None otherwise."""
    sides = [size] if isinstance(size, int) else list(size)
    return int(sides[0]) if len(sides) in (1, 2) and len(set(sides)) == 1 else None


def _with_padding(base: ImageTransform, pad_to_square: bool, mean: tuple[float, ...]) -> ImageTransform:
    return PadToSquare(base, mean) if pad_to_square else base
