"""Precision and per-part optimisation: float32 masters under bf16 autocast, one LR per part, no decay on norms.

The first test is the reason the recipe keeps float32 masters: a tiny model
stored in bfloat16 with weights of size ~1e-2 trained at LLaVA's lr 2e-5.
Plain AdamW on the bf16 weights rounds most updates away (bf16's spacing
around 1e-2 is 6e-5); mmtune's run, which trains float32 copies under bf16
autocast, moves nearly every weight.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import make_batch, mixed_records, tiny_cfg
from safetensors.torch import load_file

from mmtune.cli import main
from mmtune.config import TrainConfig
from mmtune.errors import MMTuneError
from mmtune.model import build_model
from mmtune.train.param_groups import norm_parameter_names, param_groups
from mmtune.train.precision import keep_trainable_fp32
from mmtune.train.optim import build_optimizer, resolve_mixed_precision

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "train"


def _changed_share(after: torch.Tensor, before: torch.Tensor) -> float:
    return float((after.float() != before.float()).float().mean())


def test_bf16_recipe_updates_small_weights_that_bf16_adamw_rounds_away(tmp_path, capsys):
    cfg = tiny_cfg("tiny_mllm", initializer_range=0.02)
    cfg.model.lm.dtype = "bfloat16"
    torch.manual_seed(0)
    init = build_model(cfg.model)  # what the run below starts from (same seed, same tokenizer files)
    w0 = {k: v.clone() for k, v in init.model.lm.state_dict().items()}
    big = [k for k, v in w0.items() if v.ndim == 2 and "embed" not in k and "lm_head" not in k]  # decoder matrices
    assert big and all(w0[k].dtype == torch.bfloat16 for k in big)
    assert 0.005 < float(torch.cat([w0[k].abs().flatten().float() for k in big]).median()) < 0.03

    # Plain bf16-weights AdamW, one step on a mixed batch.
    naive = copy.deepcopy(init.model)
    naive.set_trainable("instruct")
    opt = torch.optim.AdamW([p for p in naive.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0)
    batch, _ = make_batch(init, mixed_records())
    naive(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}).loss.backward()
    opt.step()
    naive_sd = naive.lm.state_dict()
    naive_share = sum(_changed_share(naive_sd[k], w0[k]) for k in big) / len(big)

    # mmtune's recipe: the same model config and lr, mixed_precision auto -> bf16 autocast, one step.
    out = tmp_path / "run"
    args = ["train", str(REPO / "configs" / "tiny_mllm.yaml"), "--output-dir", str(out), "--max-steps", "1",
            f"data.train=[{FIX / 'mixed.jsonl'}]", f"model.tokenizer.train_files=[{FIX / 'mixed.jsonl'}]",
            f"data.image_root={FIX}", "model.lm.dtype=bfloat16", "model.lm.config.initializer_range=0.02",
            "train.mixed_precision=auto", "train.lr=2e-5", "train.warmup_ratio=0", "train.lr_schedule=constant",
            "train.batch_size=4", "train.progress=false"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mixed precision bf16" in printed and "weights and moments in float32" in printed
    trained = load_file(str(out / "checkpoint-1" / "lm" / "model.safetensors"))
    assert all(trained[k].dtype == torch.float32 for k in big)  # the masters were saved
    ours_share = sum(_changed_share(trained[k], w0[k]) for k in big) / len(big)
    assert ours_share > 0.9, ours_share
    assert naive_share < 0.5, naive_share


def test_trainable_parts_become_float32_frozen_parts_stay_half():
    cfg = tiny_cfg("tiny_mllm")
    cfg.model.lm.dtype = "bfloat16"
    torch.manual_seed(0)
    model = build_model(cfg.model).model
    model.set_trainable("align")
    names = keep_trainable_fp32(model)
    assert names and all(n.startswith("projector.") for n in names) or not names
    assert all(p.dtype == torch.float32 for p in model.projector.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.lm.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.vision.parameters())
    model.set_trainable("instruct")
    keep_trainable_fp32(model)
    assert all(p.dtype == torch.float32 for p in model.lm.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.vision.parameters())  # frozen tower
    assert model.lm.get_input_embeddings().weight is model.lm.get_output_embeddings().weight  # still tied


def test_autocast_mode_follows_the_stored_dtype():
    assert resolve_mixed_precision("auto", torch.bfloat16) == "bf16"
    with pytest.raises(MMTuneError, match="train.mixed_precision bf16"):
        resolve_mixed_precision("no", torch.bfloat16)
    assert resolve_mixed_precision("no", torch.float32) == "no"


def test_one_learning_rate_per_part_and_no_decay_on_biases_and_norms():
    cfg = tiny_cfg("tiny_mllm")
    torch.manual_seed(0)
    model = build_model(cfg.model).model
    model.set_trainable("instruct", unfreeze_vision=True)
    tc = TrainConfig(lr=2e-5, projector_lr=1e-3, vision_lr=2e-6, weight_decay=0.1)
    opt = build_optimizer(model.named_parameters(), tc, norm_parameter_names(model))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert list(by_name) == ["vision", "vision (no decay)", "projector", "projector (no decay)", "lm", "lm (no decay)"]
    assert [by_name[n]["lr"] for n in ("vision", "projector", "lm")] == [2e-6, 1e-3, 2e-5]
    assert all(g["weight_decay"] == (0.1 if "no decay" not in n else 0.0) for n, g in by_name.items())
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(n.endswith("bias") or "norm" in n or "ln_" in n or p.ndim < 2
               for n, p in model.named_parameters() if n in no_decay)
    assert not any(n.endswith("bias") or "norm" in n.lower() or ".ln_" in n for n in decay)
    assert any("input_layernorm" in n for n in no_decay) and any(".ln_1." in n for n in no_decay)
    # Every trainable tensor is in exactly one group; frozen ones in none.
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len({id(p) for p in model.parameters() if p.requires_grad})
    # null part rates fall back to train.lr
    groups = param_groups(model.named_parameters(), TrainConfig(lr=3e-4))
    assert {g["lr"] for g in groups} == {3e-4}


def test_groups_printed_with_counts_before_step_one(tmp_path, capsys):
    args = ["train", str(REPO / "configs" / "tiny_mllm.yaml"), "--output-dir", str(tmp_path / "r"), "--max-steps", "1",
            f"data.train=[{FIX / 'mixed.jsonl'}]", f"model.tokenizer.train_files=[{FIX / 'mixed.jsonl'}]",
            f"data.image_root={FIX}", "train.projector_lr=1e-3", "train.batch_size=2", "train.progress=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    head = out.split("done, step")[0]
    assert "group projector " in head and "lr 0.001" in head and "group lm (no decay)" in head
    assert "params in" in head
