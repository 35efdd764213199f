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
from mmtune.data.images import background_from_mean, expand_to_square
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


# Transforms are classes, not closures, so DataLoader workers can pickle them.
class PadToSquare:
    """LLaVA-1.5's 'pad' aspect ratio: pad with the normalization mean colour, then `base`."""

    def __init__(self, base: ImageTransform, mean: tuple[float, ...]) -> None:
        self.base = base
        self.fill = background_from_mean(mean)

    def __call__(self, img: Any) -> torch.Tensor:
        return self.base(expand_to_square(img if img.mode == "RGB" else img.convert("RGB"), self.fill))


def _with_padding(base: ImageTransform, pad_to_square: bool, mean: tuple[float, ...]) -> ImageTransform:
    return PadToSquare(base, mean) if pad_to_square else base
