"""Condensed data selection: turn a pool of unified records into a small, high-quality, diverse subset.

Methods (registry `METHODS`): random, longest, quality, kmeans, facility, qdit,
deita, dedup. Python API: `select_records(records, k, method, ...)` returns a
`SelectionResult`; `select_pool(path, k, method, out=...)` reads and writes
files; the CLI is `mmtune select` (`mmtune/cli/select.py`).
"""

from mmtune.select.algorithms import METHODS, SelectionError, SelectParams
from mmtune.config import SelectConfig
from mmtune.select.api import SelectionResult, select_config, select_pool, select_records
from mmtune.select.embed import ImageEncoder, TextEncoder, embed_records
from mmtune.select.facility import facility_objective, lazy_greedy
from mmtune.select.quality import build_scorer, normalise

__all__ = [
    "METHODS",
    "ImageEncoder",
    "SelectParams",
    "SelectionError",
    "SelectionResult",
    "TextEncoder",
    "build_scorer",
    "embed_records",
    "facility_objective",
    "lazy_greedy",
    "normalise",
    "select_pool",
    "select_records",
    "select_config",
    "SelectConfig",
]
