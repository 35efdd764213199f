"""Speed of `mmtune eval` generation: batched + KV cache vs one question at a time.

LLaVA's evaluation scripts (model_vqa_loader.py) answer one question per
`generate` call (their loader asserts batch_size == 1). This benchmark runs
the same tiny random-weight MLLM (configs/tiny_mllm.yaml, saved with
`save_model` and reloaded with `load_model`) on the same synthetic VQA
questions (`mmtune.data.synthetic.make_pool`) through the generation code
`mmtune eval` uses (`mmtune.eval.generate.generate_prompts`), once with batches
of 16 and once with batch size 1, and prints both timings and the ratio.
Both runs decode greedily with the KV cache and produce identical answers
(checked). Needs no download and no shared data.

    python scripts/bench_eval.py                     # 256 questions, batch 16, 16 new tokens
    python scripts/bench_eval.py --n 64 --repeats 3  # quicker; best of 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="questions (default 256)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="time each setting this many times, report the best")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mmtune.config import load_config
    from mmtune.data.synthetic import IMAGE_TASKS, make_pool
    from mmtune.eval.generate import generate_prompts
    from mmtune.eval.tasks import build_prompt, get_task, parse_mode
    from mmtune.model import build_model, load_model, save_model

    cfg = load_config(ROOT / "configs" / "tiny_mllm.yaml")
    cfg.model.tokenizer.train_files = [str(ROOT / p) for p in cfg.model.tokenizer.train_files]
    # Wider random init than transformers' default, so answers differ between questions and the
    # batched-vs-single identity check below compares real text, not one repeated token.
    cfg.model.lm.config["initializer_range"] = 0.3
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        (Path(tmp) / "model").mkdir()
        save_model(build_model(cfg.model), Path(tmp) / "model")
        bundle = load_model(Path(tmp) / "model", device=args.device)
        per_task = -(-args.n // len(IMAGE_TASKS))
        records = make_pool(Path(tmp) / "pool", per_task=per_task, tasks=IMAGE_TASKS, seed=0)[: args.n]
        spec, mode = get_task("vqav2"), parse_mode("zero-shot")
        prompts = [build_prompt(r, spec, mode) for r in records]

        def run(batch_size: int) -> tuple[float, list]:
            best, outs = float("inf"), []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                outs = generate_prompts(bundle, prompts, "vicuna_v1", batch_size=batch_size,
                                        max_new_tokens=args.max_new_tokens, progress=True,
                                        desc=f"batch {batch_size}")
                best = min(best, time.perf_counter() - t0)
            return best, outs

        generate_prompts(bundle, prompts[:8], "vicuna_v1", batch_size=8, max_new_tokens=2)  # warm-up
        t_batched, out_batched = run(args.batch_size)
        t_single, out_single = run(1)
    same = sum(a == b for a, b in zip(out_batched, out_single, strict=True))
    n = len(prompts)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {n} questions, "
          f"{args.max_new_tokens} new tokens, {bundle.num_image_tokens} image tokens per question")
    print(f"batched (batch {args.batch_size}): {t_batched:8.2f} s  ({n / t_batched:7.1f} questions/s)")
    print(f"one at a time (batch 1): {t_single:8.2f} s  ({n / t_single:7.1f} questions/s)")
    print(f"speed-up: {t_single / t_batched:.2f}x; identical answers: {same}/{n} "
          f"({len(set(out_batched))} distinct answers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
