"""Helpers shared by the model, generation, export and eval tests: tiny models from configs/tiny_*.yaml.

Plain functions (imported as `from helpers import ...`; pytest puts tests/ on
sys.path); fixtures live in conftest.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mmtune.config import RunConfig, load_config, save_config
from mmtune.data.collate import collate_examples
from mmtune.data.encode import TokenizedExample, tokenize_record
from mmtune.data.images import load_image
from mmtune.data.schema import Record, read_records
from mmtune.data.templates import get_template
from mmtune.model import build_model, save_model
from mmtune.model.build import ModelBundle

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FIX = ROOT / "tests" / "fixtures" / "train"

# A 2-block open_clip ViT on 32px images (4x4 patches) and an HF CLIP tower of the same image size.
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
}
HF_CLIP = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def tiny_cfg(name: str, **lm_config: Any) -> RunConfig:
    """configs/<name>.yaml with its relative paths made absolute; `lm_config` updates `model.lm.config`
    (e.g. a larger `initializer_range`, so greedy answers of random weights differ by prompt)."""
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    cfg.model.tokenizer.train_files = [str(ROOT / p) for p in cfg.model.tokenizer.train_files]
    cfg.data.train = [str(ROOT / p) for p in cfg.data.train]
    cfg.model.lm.config.update(lm_config)
    return cfg


def build_tiny(name: str, seed: int = 0, **lm_config: Any) -> tuple[ModelBundle, RunConfig]:
    """A tiny random model from configs/<name>.yaml, seeded, and its config."""
    cfg = tiny_cfg(name, **lm_config)
    torch.manual_seed(seed)
    return build_model(cfg.model), cfg


def mixed_records() -> list[Record]:
    """Text-only, one image, two images, one image: a mixed batch in a known order."""
    recs = {r.id: r for r in read_records(TRAIN_FIX / "mixed.jsonl")}
    return [recs["mix-0"], recs["colour-0"], recs["pair-0"], recs["shape-1"]]


def make_batch(
    bundle: ModelBundle, records: list[Record], max_length: int = 256
) -> tuple[dict[str, Any], list[TokenizedExample]]:
    """A training batch (vicuna_v1, images from the train fixtures) and its tokenized examples."""
    tmpl = get_template("vicuna_v1")
    exs = [
        tokenize_record(r, bundle.tokenizer, tmpl, max_length=max_length, num_image_tokens=bundle.num_image_tokens)
        for r in records
    ]
    pix = [bundle.image_transform(load_image(TRAIN_FIX / p)) for r in records for p in r.images]
    return collate_examples(exs, bundle.tokenizer.pad_token_id, pixel_values=pix or None), exs


def save_run(bundle: ModelBundle, cfg: RunConfig, run: Path, step: int = 1, template: str | None = None) -> Path:
    """Save `bundle` as RUN/checkpoint-STEP with the run_config.yaml a training run writes next to it.

    `template` (when given) is set as `cfg.data.template` first: the template
    `mmtune generate` / `export` take as the one the run trained with.
    """
    ckpt = run / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_model(bundle, ckpt)
    if template is not None:
        cfg.data.template = template
    save_config(cfg, ckpt / "run_config.yaml")
    return ckpt


def cpu_launch_env(**extra: str) -> dict[str, str]:
    """The environment for a 2-process launch of mmtune on CPU (gloo): one thread per process, and no GPU
    visible, so the test is the same CPU test on a machine with GPUs (where two ranks would otherwise ask
    for cuda:0 and cuda:1, and one GPU fails with "invalid device ordinal")."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def free_port() -> int:
    """A free local TCP port for a multi-process launch's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_error(capsys: Any, command: str) -> str:
    """The one-line error `mmtune COMMAND` printed last on stderr (no traceback before it)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and not any("Traceback" in line for line in err), err
    assert err[-1].startswith(f"mmtune {command}: error: "), err
    return err[-1]
