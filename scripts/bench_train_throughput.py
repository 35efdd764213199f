"""Training throughput: mmtune's MLLM vs transformers' LlavaForConditionalGeneration, same weights.

1. Comparison (any device). The model of `--config` (default: the tiny
   MLLM) is built once by mmtune and copied, weights and all, into a
   `LlavaForConditionalGeneration` with the exporter's mapping
   (`mmtune.model.export.hf_llava_model`). Both train on the same synthetic
   batch (each row: a few text tokens, one image's run of image tokens,
   text; labels on the text after the image), stage "instruct" (projector + LM
   trained, tower frozen), AdamW, on the same device in one process. One timed
   step = forward + backward + optimizer step. Repetitions interleave the two
   models (and alternate which goes first) so machine noise hits both alike;
   the median of the per-repetition ratios is printed (>1: mmtune is faster). The two initial
   losses are checked to agree, so both really compute the same thing.

2. MFU (CUDA only, or `--shrink` anywhere). mmtune alone on a
   LLaVA-1.5-7B-shaped model with random weights in bf16: CLIP ViT-L/14-336
   shaped tower (frozen) + 2-layer GELU projector + Llama-2-7B-shaped LM,
   gradient checkpointing, AdamW (fused on CUDA; states in bf16 so that 7B
   fits one 80 GB GPU). Model FLOPs per step =
   6 x (LM + projector params) x tokens  (trained: forward + backward)
   + 12 x layers x d_model x seq_len x tokens  (LM attention scores, fwd + bwd)
   + 2 x tower params x tower tokens  (frozen tower: forward only),
   MFU = FLOPs per step / step time / `--peak-flops` (default 989e12: H100
   SXM dense bf16). The plain 6 x all params x tokens figure is printed too.
   Recomputation from checkpointing is not counted (that would be HFU).
   `--shrink` runs the same code path with a few narrow layers and small images
   (bf16 on CPU works, just slowly), to show the path executes.

3. `--gpu`: the training recipe itself at 7B shape, FSDP over every visible
   GPU. The script re-launches itself with torchrun, one process per GPU; each
   builds the LLaVA-1.5-7B-shaped model (bf16, SDPA), keeps the trainable
   weights as float32 masters (`mmtune.train.precision`), shards it with
   mmtune's FSDP2 plan (`mmtune.train.sharding.shard_model`: bf16 all-gathers,
   float32 gradient reduction), enables gradient checkpointing, and trains on
   unpadded (packed-equivalent) synthetic rows under bf16 autocast with AdamW
   (fused); `--compile` compiles each block first, as `train.compile: true` does. Printed: samples/s
   and tokens/s (all GPUs), peak memory per GPU
   (max over GPUs), and MFU = model FLOPs per step of the global batch (the
   formula of part 2) / step time / (GPUs x `--peak-flops`). With `--shrink`
   the same path runs as one CPU process (gloo), which the test suite does.

    python scripts/bench_train_throughput.py                    # tiny config, CPU
    python scripts/bench_train_throughput.py --shrink           # + the MFU path, shrunk
    python scripts/bench_train_throughput.py --device cuda      # + 7B-shaped MFU on a GPU
    python scripts/bench_train_throughput.py --gpu              # 7B-shaped FSDP recipe on all GPUs
    python scripts/bench_train_throughput.py --gpu --shrink     # the same path, small, one CPU process
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

H100_BF16_DENSE = 989e12


# --------------------------------------------------------------------------- #
# batches and steps
# --------------------------------------------------------------------------- #


def synthetic_batch(
    *, batch_size: int, seq_len: int, num_image_tokens: int, image_token_id: int, vocab: int, image_size: int,
    device: torch.device, dtype: torch.dtype, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Rows of [8 text][one image run][text]; loss on the text after the image; no padding."""
    prefix = 8
    if seq_len < prefix + num_image_tokens + 8:
        raise SystemExit(f"--seq-len {seq_len} is too short for {num_image_tokens} image tokens + text")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    ids[ids == image_token_id] = (image_token_id + 1) % vocab  # image tokens only where the image goes
    ids[:, prefix : prefix + num_image_tokens] = image_token_id
    labels = ids.clone()
    labels[:, : prefix + num_image_tokens] = -100
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
    }


def make_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=True)
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def timed(model, opt, batch, steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` steps."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, batch)
    sync(device)
    return (time.perf_counter() - t0) / steps


# --------------------------------------------------------------------------- #
# 1. mmtune vs transformers
# --------------------------------------------------------------------------- #


def load_model_config(path: Path) -> Any:
    from mmtune.config import load_config

    cfg = load_config(path)
    tok = cfg.model.tokenizer
    tok.train_files = [str(p if Path(p).is_absolute() else REPO / p) for p in tok.train_files]
    return cfg.model


def compare(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    from mmtune.model import build_model
    from mmtune.model.export import hf_llava_model

    mcfg = load_model_config(args.config)
    torch.manual_seed(args.seed)
    bundle = build_model(mcfg)
    mm = bundle.model.to(device)
    hf = hf_llava_model(bundle, device=device)
    mm.set_trainable("instruct")
    for name, p in hf.named_parameters():
        p.requires_grad_(not name.startswith("model.vision_tower."))
    mm.train()
    hf.train()
    dtype = next(mm.lm.parameters()).dtype
    n_img = bundle.num_image_tokens
    batch = synthetic_batch(
        batch_size=args.batch_size, seq_len=args.seq_len, num_image_tokens=n_img,
        image_token_id=mm.image_token_id, vocab=len(bundle.tokenizer),
        image_size=int(hf.config.vision_config.image_size), device=device, dtype=dtype, seed=args.seed,
    )
    with torch.no_grad():
        l_mm, l_hf = float(mm(**batch).loss), float(hf(**batch).loss)
    if abs(l_mm - l_hf) > 1e-3 * max(1.0, abs(l_mm)):
        raise SystemExit(f"the two models disagree on the loss ({l_mm} vs {l_hf}); not the same computation")
    t_mm = sum(p.numel() for p in mm.parameters() if p.requires_grad)
    t_hf = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    if t_mm != t_hf:
        raise SystemExit(f"trainable parameter counts differ: mmtune {t_mm:,} vs transformers {t_hf:,}")
    runners = {
        "mmtune": (mm, make_optimizer(mm, device)),
        "transformers": (hf, make_optimizer(hf, device)),
    }
    for model, opt in runners.values():
        for _ in range(args.warmup):
            train_step(model, opt, batch)
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for rep in range(args.reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            model, opt = runners[name]
            times[name].append(timed(model, opt, batch, args.steps, device))
    tokens = int(batch["attention_mask"].sum())
    print(
        f"comparison on {device} ({torch.get_num_threads()} CPU threads): {args.config.name}, "
        f"batch {args.batch_size} x {args.seq_len} tokens ({n_img} image tokens per row), "
        f"{t_mm:,} trainable params, attention lm={_attn(mm.base_lm())} tower={_attn(hf.model.vision_tower)}"
    )
    print(f"  initial loss: mmtune {l_mm:.6f}  transformers {l_hf:.6f}")
    print(f"  {'':<13} {'median s/step':>14} {'min s/step':>11} {'samples/s':>10} {'tokens/s':>10}")
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        print(
            f"  {name:<13} {med[name]:>14.5f} {min(ts):>11.5f} {args.batch_size / med[name]:>10.1f} "
            f"{tokens / med[name]:>10.0f}"
        )
    ratio = med["transformers"] / med["mmtune"]
    # Each repetition times both models back to back, so its ratio cancels slow drifts in machine load.
    paired = statistics.median(h / m for h, m in zip(times["transformers"], times["mmtune"], strict=True))
    best = min(times["transformers"]) / min(times["mmtune"])
    print(
        f"  throughput ratio mmtune / transformers: {paired:.3f} (median of {args.reps} paired repetitions; "
        f"ratio of medians {ratio:.3f}, of best times {best:.3f})"
    )
    return {"ratio": paired, "ratio_of_medians": ratio, "ratio_of_best": best, **{f"{k}_s_per_step": v for k, v in med.items()}}


def _attn(model: torch.nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "_attn_implementation", "?"))


# --------------------------------------------------------------------------- #
# 2. MFU on a LLaVA-1.5-7B-shaped model
# --------------------------------------------------------------------------- #


def llava15_7b_config(shrink: bool) -> Any:
    """ModelConfig of LLaVA-1.5-7B's shapes (random weights, bf16); `shrink`: a few narrow layers."""
    from mmtune.config import (
        LMConfig,
        ModelConfig,
        ProjectorConfig,
        TokenizerConfig,
        VisionConfig,
    )

    tower = {  # CLIP ViT-L/14-336
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
        "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
        "projection_dim": 768, "hidden_act": "quick_gelu",
    }
    lm = {  # Llama-2-7B / Vicuna-7B
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    }
    if shrink:
        tower.update(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                     image_size=112, projection_dim=32)
        lm.update(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4)
    return ModelConfig(
        mode="mllm",
        lm=LMConfig(config=lm, dtype="bfloat16", attn_implementation="sdpa"),
        vision=VisionConfig(backend="hf", config=tower, feature_layer=-2, select_strategy="patch"),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        tokenizer=TokenizerConfig(train_vocab_size=300),
    )


def model_flops_per_step(model: Any, batch_size: int, seq_len: int) -> tuple[float, float, dict[str, int]]:
    """(model FLOPs per training step as in the module docstring, plain 6 x N x tokens, param counts)."""
    lm = model.base_lm()
    conf = lm.config.get_text_config()
    n_embed = lm.get_input_embeddings().weight.numel()
    head = lm.get_output_embeddings()
    tied = head is not None and head.weight is lm.get_input_embeddings().weight
    n_lm = sum(p.numel() for p in lm.parameters())
    n_lm_matmul = n_lm - (0 if tied else n_embed)  # an embedding lookup is no matmul; the head is
    n_proj = sum(p.numel() for p in model.projector.parameters())
    n_vis = sum(p.numel() for p in model.vision.parameters())
    tokens = batch_size * seq_len
    tower_tokens = batch_size * (model.vision.num_patches + int(model.vision.has_cls))
    flops = (
        6 * (n_lm_matmul + n_proj) * tokens
        + 12 * conf.num_hidden_layers * conf.hidden_size * seq_len * tokens
        + 2 * n_vis * tower_tokens
    )
    simple = 6 * (n_lm + n_proj + n_vis) * tokens
    return float(flops), float(simple), {"lm": n_lm, "projector": n_proj, "vision": n_vis}


def mfu(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    from mmtune.model import build_model

    mcfg = llava15_7b_config(args.shrink)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device(device):  # initialise straight on the GPU: a 7B CPU init takes minutes
        bundle = build_model(mcfg)
    model = bundle.model.to(device)
    model.set_trainable("instruct")
    if not args.no_grad_ckpt:
        model.gradient_checkpointing_enable()
    model.train()
    opt = make_optimizer(model, device)
    bs = args.mfu_batch_size or (2 if args.shrink else 8)
    seq = args.mfu_seq_len or (128 if args.shrink else 1024)
    batch = synthetic_batch(
        batch_size=bs, seq_len=seq, num_image_tokens=bundle.num_image_tokens, image_token_id=model.image_token_id,
        vocab=32000, image_size=int(mcfg.vision.config["image_size"]), device=device, dtype=torch.bfloat16,
        seed=args.seed,
    )
    flops, simple, counts = model_flops_per_step(model, bs, seq)
    print(
        f"MFU on {device}: LLaVA-1.5-7B-shaped{' (SHRUNK)' if args.shrink else ''} bf16, params "
        + ", ".join(f"{k} {v / 1e9:.3f}B" for k, v in counts.items())
        + f"; batch {bs} x {seq} tokens ({bundle.num_image_tokens} image tokens per row); "
        f"gradient checkpointing {'off' if args.no_grad_ckpt else 'on'}; built in {time.perf_counter() - t0:.0f}s"
    )
    for _ in range(args.warmup):
        train_step(model, opt, batch)
    per_step = [timed(model, opt, batch, args.steps, device) for _ in range(args.reps)]
    step = statistics.median(per_step)
    tokens_s = bs * seq / step
    peak = args.peak_flops
    out = {
        "s_per_step": step,
        "tokens_per_s": tokens_s,
        "samples_per_s": bs / step,
        "mfu": flops / step / peak,
        "mfu_6n": simple / step / peak,
    }
    print(
        f"  {step:.4f} s/step, {bs / step:.2f} samples/s, {tokens_s:,.0f} tokens/s; model FLOPs/step {flops:.3e}; "
        f"MFU {100 * out['mfu']:.1f}% (6N-only: {100 * out['mfu_6n']:.1f}%) of {peak:.3g} FLOP/s"
    )
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    else:
        print("  (CPU: the MFU figure is against --peak-flops, a GPU number; it only shows the path runs)")
    return out


# --------------------------------------------------------------------------- #
# 3. --gpu: the FSDP recipe at 7B shape
# --------------------------------------------------------------------------- #


def fsdp_recipe(args: argparse.Namespace) -> dict[str, float]:
    """One process of the FSDP run (see module docstring, part 3); rank 0 prints."""
    import torch.distributed as dist

    from mmtune.model import build_model
    from mmtune.train.param_groups import norm_parameter_names, param_groups
    from mmtune.train.precision import keep_trainable_fp32
    from mmtune.train.sharding import shard_model, wrap_plan

    cuda = torch.cuda.is_available() and not args.shrink_cpu
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # one in-process rank: any free port (two runs at once must not clash)
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        mcfg = llava15_7b_config(args.shrink)
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        with torch.device(device):
            bundle = build_model(mcfg)
        model = bundle.model
        model.set_trainable("instruct")
        keep_trainable_fp32(model)
        if not args.no_grad_ckpt:
            model.gradient_checkpointing_enable()
        if args.compile:  # train.compile: each block compiled, before sharding (mmtune.train.compiling)
            from mmtune.train.compiling import compile_blocks

            compile_blocks(model)
        model.train()
        bs = args.mfu_batch_size or (2 if args.shrink else 8)
        seq = args.mfu_seq_len or (128 if args.shrink else 2048)
        # Before sharding, while every tensor is whole: FLOPs of the global batch (bs rows on each GPU).
        flops, simple, counts = model_flops_per_step(model, bs * world, seq)
        shard_model(model, "bf16")
        from mmtune.config import TrainConfig

        groups = param_groups(model.named_parameters(), TrainConfig(lr=1e-6), norm_parameter_names(model))
        opt = torch.optim.AdamW(groups, lr=1e-6, fused=cuda)
        batch = synthetic_batch(
            batch_size=bs, seq_len=seq, num_image_tokens=bundle.num_image_tokens,
            image_token_id=model.image_token_id, vocab=32000, image_size=int(mcfg.vision.config["image_size"]),
            device=device, dtype=torch.bfloat16, seed=args.seed + rank,
        )

        def step() -> float:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.reps):
            sync(device)
            dist.barrier()
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            times.append((time.perf_counter() - t) / args.steps)
        per_step = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
        dist.all_reduce(per_step, op=dist.ReduceOp.MAX)  # the slowest GPU sets the pace
        peak_mem = torch.tensor([torch.cuda.max_memory_allocated(device) if cuda else 0], dtype=torch.float64,
                                device=device)
        dist.all_reduce(peak_mem, op=dist.ReduceOp.MAX)
        sec = float(per_step)
        out = {
            "gpus": float(world), "s_per_step": sec, "samples_per_s": bs * world / sec,
            "tokens_per_s": bs * world * seq / sec, "peak_mem_gib": float(peak_mem) / 2**30,
            "mfu": flops / sec / (world * args.peak_flops), "mfu_6n": simple / sec / (world * args.peak_flops),
        }
        if rank == 0:
            print(
                f"FSDP recipe on {world} x {device.type}: LLaVA-1.5-7B-shaped{' (SHRUNK)' if args.shrink else ''}, "
                + ", ".join(f"{k} {v / 1e9:.3f}B" for k, v in counts.items())
                + f"; float32 masters, bf16 autocast + all-gathers, SDPA, gradient checkpointing "
                f"{'off' if args.no_grad_ckpt else 'on'}; torch.compile per block {'on' if args.compile else 'off'}; "
                f"{len(wrap_plan(model))} FSDP units + root; "
                f"{bs} x {seq} tokens per GPU, no padding; built in {time.perf_counter() - t0:.0f}s"
            )
            print(
                f"  {sec:.4f} s/step, {out['samples_per_s']:.2f} samples/s, {out['tokens_per_s']:,.0f} tokens/s, "
                f"peak memory {out['peak_mem_gib']:.1f} GiB per GPU, MFU {100 * out['mfu']:.1f}% "
                f"(6N-only {100 * out['mfu_6n']:.1f}%) of {world} x {args.peak_flops:.3g} FLOP/s"
            )
            if not cuda:
                print("  (CPU: the MFU figure is against --peak-flops, a GPU number; it only shows the path runs)")
        return out
    finally:
        dist.destroy_process_group()


def launch_fsdp(args: argparse.Namespace, argv: list[str]) -> int:
    """--gpu: re-run this script under torchrun with one process per visible GPU (or run in-process)."""
    if "LOCAL_RANK" in os.environ or not torch.cuda.is_available() or args.shrink_cpu:
        fsdp_recipe(args)
        return 0
    import subprocess

    n = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           str(Path(__file__).resolve()), *argv]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny_mllm.yaml",
                        help="run config whose model section is compared (default: the tiny MLLM)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the machine is shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compare", action="store_true", help="skip part 1")
    parser.add_argument("--shrink", action="store_true", help="run the MFU path with a few narrow layers")
    parser.add_argument("--no-mfu", action="store_true", help="skip part 2 even on a GPU")
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE,
                        help="peak dense bf16 FLOP/s of the accelerator (default: H100 SXM 989e12)")
    parser.add_argument("--mfu-batch-size", type=int, default=None, help="default 8 (shrunk: 2)")
    parser.add_argument("--mfu-seq-len", type=int, default=None, help="default 1024 (shrunk: 128)")
    parser.add_argument("--no-grad-ckpt", action="store_true", help="MFU run without gradient checkpointing")
    parser.add_argument("--compile", action="store_true",
                        help="--gpu: torch.compile each decoder layer and tower block (train.compile: true)")
    parser.add_argument("--gpu", action="store_true",
                        help="part 3 only: the FSDP recipe at 7B shape over all visible GPUs (with --shrink and no "
                             "GPU: one CPU process)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.shrink_cpu = args.shrink and not torch.cuda.is_available()
    if args.gpu:
        if not torch.cuda.is_available() and not args.shrink:
            raise SystemExit("--gpu needs a CUDA device (add --shrink to run the same path small on CPU)")
        return launch_fsdp(args, argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    if not args.no_compare:
        compare(args, device)
    if args.no_mfu:
        return 0
    if device.type == "cuda" or args.shrink:
        mfu(args, device)
    else:
        print("MFU (LLaVA-1.5-7B shape, bf16): skipped, no CUDA device; --shrink runs the same path small on CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
