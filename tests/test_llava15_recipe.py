"""configs/llava15_7b_*.yaml hold LLaVA-1.5's published recipe (scripts/v1_5/pretrain.sh, finetune.sh).

The values below are the ones docs/train.md tabulates next to LLaVA's script flags.
"""

from pathlib import Path

from mmtune.config import load_config
from mmtune.data.templates import get_template

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_stage1_align_matches_pretrain_sh() -> None:
    cfg = load_config(CONFIGS / "llava15_7b_align.yaml")
    assert cfg.data.template == "plain" and get_template(cfg.data.template).name == "plain"
    assert cfg.train.stage == "align"  # projector only
    assert cfg.train.lr == 1e-3
    assert cfg.train.batch_size * cfg.train.grad_accum * 8 == 256  # written for 8 GPUs, as pretrain.sh
    assert cfg.train.num_epochs == 1 and cfg.train.max_steps == -1
    assert cfg.train.warmup_ratio == 0.03 and cfg.train.lr_schedule == "cosine" and cfg.train.weight_decay == 0
    assert cfg.data.max_length == 2048
    assert not cfg.data.group_by_length and not cfg.data.group_by_modality
    assert not cfg.model.vision.pad_to_square and cfg.model.vision.feature_layer == -2
    assert cfg.model.projector.type == "mlp2x_gelu"


def test_stage2_instruct_matches_finetune_sh() -> None:
    cfg = load_config(CONFIGS / "llava15_7b_instruct.yaml")
    assert cfg.data.template == "vicuna_v1"
    assert cfg.train.stage == "instruct" and not cfg.train.lora.enabled
    assert cfg.train.lr == 2e-5
    assert cfg.train.batch_size * cfg.train.grad_accum * 8 == 128  # written for 8 GPUs, as finetune.sh
    assert cfg.train.num_epochs == 1 and cfg.train.max_steps == -1
    assert cfg.train.warmup_ratio == 0.03 and cfg.train.lr_schedule == "cosine" and cfg.train.weight_decay == 0
    assert cfg.data.max_length == 2048
    assert cfg.data.group_by_modality and cfg.data.group_by_length
    assert cfg.model.vision.pad_to_square and cfg.model.vision.feature_layer == -2
    assert cfg.model.projector.checkpoint
