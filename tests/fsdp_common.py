"""What the FSDP tests (test_train_fsdp.py, test_train_fsdp_faults.py) share: the data, the overrides,
and the one-process reference that replays an FSDP run's traced global batches with the same recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmtune.config import RunConfig, load_config
from mmtune.data.collate import collate_examples
from mmtune.data.encode import tokenize_record
from mmtune.data.images import load_image
from mmtune.data.schema import read_records
from mmtune.data.templates import get_template
from mmtune.model import build_model
from mmtune.model.io import load_model
from mmtune.model.lora import apply_lora
from mmtune.train.metrics import read_metrics
from mmtune.train.optim import build_optimizer, build_scheduler
from mmtune.train.param_groups import norm_parameter_names
from mmtune.train.precision import keep_trainable_fp32
from mmtune.train.validate import ValidationResult, ValidationSet

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "train"
CONFIG = REPO / "configs" / "tiny_mllm.yaml"
STEPS, BATCH = 4, 2


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def overrides(data: Path) -> list[str]:
    return [f"data.train=[{data}]", f"model.tokenizer.train_files=[{data}]", f"data.image_root={FIX}",
            f"train.batch_size={BATCH}", "train.save_every=2", "train.progress=false", "train.lr_schedule=cosine"]


def eval_overrides(eval_file: Path) -> list[str]:
    return [f"data.eval=[{eval_file}]", "train.eval_every=2", "train.save_best=true"]


def train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def eval_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]


def image_and_text_rows() -> tuple[list[str], list[str]]:
    image = [x for x in (FIX / "mixed.jsonl").read_text().splitlines() if json.loads(x)["images"]]
    return image, (FIX / "text.jsonl").read_text().splitlines()


def alternating(tmp: Path) -> Path:
    """Image and text records line by line: rank 0 draws only image batches, rank 1 only text ones."""
    image, text = image_and_text_rows()
    data = tmp / "alternating.jsonl"
    data.write_text("\n".join(x for pair in zip(image, text, strict=False) for x in pair) + "\n")
    return data


def seeded_model(data: Path, extra: tuple[str, ...] = ()) -> tuple[RunConfig, Any]:
    """The run's config and the model it starts from: same seed, LoRA applied as the trainer does."""
    from accelerate.utils import set_seed

    cfg = load_config(CONFIG, overrides=[*overrides(data), *extra])
    set_seed(cfg.train.seed)
    bundle = build_model(cfg.model)
    if cfg.train.lora.enabled:  # as the trainer does: LoRA right after building, same RNG draws
        apply_lora(bundle.model, cfg.train.lora)
    return cfg, bundle


def reference(data: Path, first: Path, extra: tuple[str, ...] = (), *, steps: int | None = None,
              total_steps: int = STEPS) -> tuple[list[float], Any]:
    """One process, the same global batch per step (both ranks' traced batches), same recipe, for `steps`
    steps (default: every step the run traced, fewer when it was stopped) of a `total_steps` schedule."""
    cfg, bundle = seeded_model(data, extra)
    opt, sched = recipe(bundle.model, cfg, total_steps)
    if steps is None:
        steps = len({r["step"] for r in rows(first / "batches.jsonl")})
    return replay(bundle, cfg, opt, sched, data, first, range(steps)), bundle


def recipe(model: torch.nn.Module, cfg: RunConfig, total_steps: int = STEPS) -> tuple[Any, Any]:
    model.set_trainable("instruct")
    keep_trainable_fp32(model)
    model.train()
    opt = build_optimizer(model.named_parameters(), cfg.train, norm_parameter_names(model))
    return opt, build_scheduler(opt, cfg.train, total_steps)


def replay(bundle: Any, cfg: RunConfig, opt: Any, sched: Any, data: Path, first: Path, steps: range) -> list[float]:
    model = bundle.model
    params = [p for p in model.parameters() if p.requires_grad]
    records = {r.id: r for r in read_records(data)}
    tmpl = get_template(cfg.data.template)
    traces = [rows(first / "batches.jsonl"), rows(first / "batches-rank1.jsonl")]
    losses = []
    for step in steps:
        step_losses = []
        for trace in traces:
            micros = [r for r in trace if r["step"] == step + 1]  # train.grad_accum micro-batches per step
            for micro in micros:
                recs = [records[i] for i in micro["ids"]]
                exs = [tokenize_record(r, bundle.tokenizer, tmpl, max_length=cfg.data.max_length,
                                       num_image_tokens=bundle.num_image_tokens) for r in recs]
                pix = [bundle.image_transform(load_image(FIX / p)) for r in recs for p in r.images]
                batch = collate_examples(exs, bundle.tokenizer.pad_token_id, pixel_values=pix or None)
                loss = model(**{k: batch.get(k) for k in ("input_ids", "attention_mask", "labels",
                                                          "pixel_values")}).loss
                # FSDP averages the two ranks' gradients; accumulation averages the micro-batches'
                (loss / (len(traces) * len(micros))).backward()
                step_losses.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(sum(step_losses) / len(step_losses))
    return losses


def one_process_eval(checkpoint: Path, eval_file: Path) -> ValidationResult:
    cfg = load_config(checkpoint / "run_config.yaml", RunConfig)
    cfg.data.eval = [str(eval_file)]
    bundle = load_model(checkpoint)  # the sharded weights, consolidated in memory
    return ValidationSet(cfg, bundle, rank=0, world_size=1).evaluate(bundle.model, "cpu", lambda t: t)
