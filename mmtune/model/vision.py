"""Vision towers (kept as an import path): the towers live in mmtune/model/towers/, one module per backend.

`mmtune.model.towers` holds the registry (`TOWERS`, `register_tower`,
`build_vision_tower`) and the base class; `open_clip_tower.py` and
`hf_tower.py` the two backends; `open_clip_convert.py` the export-only
open_clip -> transformers CLIPVisionModel conversion.
"""

from mmtune.model.towers import (  # noqa: F401
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SELECT_STRATEGIES,
    TOWERS,
    HFImageTransform,
    HFVisionTower,
    ImageTransform,
    OpenClipTower,
    PadToSquare,
    VisionTower,
    build_hf_tower,
    build_open_clip_tower,
    build_vision_tower,
    register_tower,
)
from mmtune.model.towers.open_clip_convert import (  # noqa: F401
    check_open_clip_convertible,
    open_clip_to_hf_clip,
)
