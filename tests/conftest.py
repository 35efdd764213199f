"""Shared test set-up: deterministic, CPU-only, offline."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

FIXTURES = Path(__file__).parent / "fixtures"
# ../shared next to the checkout; MMTUNE_SHARED points elsewhere (e.g. from a git worktree).
SHARED_DATA = Path(os.environ.get("MMTUNE_SHARED") or Path(__file__).resolve().parents[2] / "shared") / "data"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def one_thread():
    """Tiny models run fastest single-threaded, and the test machine's cores are shared.

    Use per module with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
