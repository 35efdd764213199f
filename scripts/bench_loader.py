"""Loader throughput: shards -> ExampleStream -> Batcher -> pinned tensors, next to PIL's decode-and-resize limit.

Real JPEGs (the COCO / GQA / Visual Genome / LLaMA-Factory images in
`../shared/data`, see its README) are written as `mmtune shard` webdataset
shards, one image per record with a short question and answer, repeated to
`--records` samples. In one process and one run, the script measures:

1. the limit: PIL decode + RGB + resize to `--size` px (bicubic) of the same
   JPEG bytes, images/s, decoding in full;
2. the same with JPEG draft mode (`Image.draft`, libjpeg DCT scaling to a
   size >= `--size`) and the pixel difference draft vs full decode after the
   resize (mean and max absolute difference in 0-255 units, PSNR);
3. the whole path the trainer runs per process: webdataset shards read and
   shuffled by `ExampleStream`, records tokenized (byte-level BPE), images
   decoded and transformed by the tower's own transform (pad to square,
   resize to `--size`, normalise, to tensor), `Batcher` (collation; length
   grouping off, since its buffer would serve batches from memory), and the
   batch's tensors pinned (CUDA only; pinning needs a
   GPU) -- samples/s with 0 workers (the main process does it all) and with
   `--workers` DataLoader workers, full decode and draft decode.

Figures: pipeline samples/s per worker / the limit (target >= 90%). With one
image per sample, the limit in samples/s equals the images/s of (1) or (2).

    python scripts/bench_loader.py                       # needs ../shared/data
    python scripts/bench_loader.py --records 400 --workers 2
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
# ../shared/data next to the checkout; MMTUNE_SHARED points elsewhere (e.g. from a git worktree), as in the tests.
SHARED = Path(os.environ.get("MMTUNE_SHARED") or REPO.parent / "shared") / "data"


def find_jpegs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file())


def write_records(jpegs: list[Path], n: int, path: Path) -> None:
    questions = ["What is in the picture?", "Describe the scene briefly.", "What colour is the main object?"]
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            img = jpegs[i % len(jpegs)]
            rec = {"id": f"img-{i}", "images": [str(img)],
                   "messages": [{"role": "user", "content": f"<image>\n{questions[i % 3]}"},
                                {"role": "assistant", "content": f"An answer about {img.stem}, number {i}."}]}
            fh.write(json.dumps(rec) + "\n")


def decode_resize(data: bytes, size: int, draft: bool) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if draft:
            img.draft("RGB", (size, size))
        img = img.convert("RGB")
        return img.resize((size, size), Image.BICUBIC)


def limit(blobs: list[bytes], size: int, draft: bool, reps: int) -> float:
    """Images/s of decode + RGB + resize, best of `reps` passes over all images."""
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        for b in blobs:
            decode_resize(b, size, draft)
        best = min(best, time.perf_counter() - t)
    return len(blobs) / best


def draft_difference(blobs: list[bytes], size: int) -> tuple[float, float, float]:
    """(mean |diff|, max |diff|, PSNR dB) of draft vs full decode after the resize, over all images."""
    import numpy as np

    diffs, worst, mse = [], 0.0, []
    for b in blobs:
        full = np.asarray(decode_resize(b, size, False), dtype=np.float64)
        fast = np.asarray(decode_resize(b, size, True), dtype=np.float64)
        d = np.abs(full - fast)
        diffs.append(float(d.mean()))
        worst = max(worst, float(d.max()))
        mse.append(float((d**2).mean()))
    m = statistics.mean(mse)
    return statistics.mean(diffs), worst, (10 * math.log10(255**2 / m) if m > 0 else math.inf)


def pipeline(shards: str, bundle: Any, args: argparse.Namespace, workers: int, draft: bool) -> float:
    """Samples/s through ExampleStream -> Batcher -> pinned tensors (after a warm-up batch)."""
    from mmtune.data.batching import Batcher
    from mmtune.data.stream import ExampleStream

    stream = ExampleStream(shards, bundle.tokenizer, "vicuna_v1", max_length=1024,
                           num_image_tokens=bundle.num_image_tokens, image_transform=bundle.image_transform,
                           shuffle=True, shuffle_buffer=64, seed=0, epochs=None, num_workers=workers,
                           prefetch_factor=args.prefetch if workers else None,
                           draft_size=args.size if draft else None)
    # No length grouping: its buffer (batch x group_factor examples) is filled before the first batch
    # and then served from memory, which would time the buffer, not the decoding.
    batcher = Batcher(stream, batch_size=args.batch_size, pad_token_id=bundle.tokenizer.pad_token_id,
                      group_by_length=False, seed=0)
    pin = torch.cuda.is_available()
    it = iter(batcher)
    next(it)  # workers started, first batch out
    n, t = 0, time.perf_counter()
    while n < args.records:
        batch = next(it)
        if pin:
            batch = {k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        n += len(batch["ids"])
    return n / (time.perf_counter() - t)


def tiny_bundle(size: int) -> Any:
    """A tiny open_clip MLLM whose tower takes `size` px images (its transform is LLaVA-1.5's)."""
    from mmtune.config import load_config
    from mmtune.model import build_model

    cfg = load_config(REPO / "configs" / "tiny_mllm.yaml")
    cfg.model.tokenizer.train_files = [str(REPO / p) for p in cfg.model.tokenizer.train_files]
    cfg.model.vision.config["vision_cfg"].update(image_size=size, patch_size=14 if size % 14 == 0 else 8)
    torch.manual_seed(0)
    return build_model(cfg.model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=SHARED, help="folder searched for JPEGs (default ../shared/data)")
    parser.add_argument("--records", type=int, default=300, help="samples timed per pipeline run")
    parser.add_argument("--size", type=int, default=336, help="tower input size in px")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the second pipeline run")
    parser.add_argument("--prefetch", type=int, default=4, help="DataLoader prefetch_factor with workers")
    parser.add_argument("--reps", type=int, default=3, help="passes for the PIL limit (best is kept)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all measurements (best kept)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if not args.images.is_dir():
        raise SystemExit(f"{args.images}: not found (the real JPEGs live in ../shared/data; see its README)")
    jpegs = find_jpegs(args.images)
    if not jpegs:
        raise SystemExit(f"{args.images}: no JPEG found")
    from mmtune.data.shards import write_shards

    blobs = [p.read_bytes() for p in jpegs]
    with tempfile.TemporaryDirectory(prefix="mmtune-bench-loader-") as tmp:
        records = Path(tmp) / "records.jsonl"
        write_records(jpegs, max(args.records, 4 * len(jpegs)), records)
        summary = write_shards(records, Path(tmp) / "shards", max_count=100, progress=False)
        shards = str(Path(tmp) / "shards" / "*.tar")
        del summary
        bundle = tiny_bundle(args.size)

        mean_d, max_d, psnr = draft_difference(blobs, args.size)
        # Rounds interleave every measurement, and each keeps its best round, so load from
        # other processes on a shared machine hits the limit and the pipeline alike.
        full = fast = 0.0
        runs: dict[tuple[int, bool], float] = {}
        for _ in range(args.rounds):
            full = max(full, limit(blobs, args.size, draft=False, reps=args.reps))
            fast = max(fast, limit(blobs, args.size, draft=True, reps=args.reps))
            for workers in (0, args.workers):
                for draft in (False, True):
                    rate = pipeline(shards, bundle, args, workers, draft)
                    runs[(workers, draft)] = max(runs.get((workers, draft), 0.0), rate)

    from PIL import Image

    px = [Image.open(io.BytesIO(b)).size for b in blobs]
    print(f"loader benchmark: {len(jpegs)} real JPEGs from {args.images} ({min(w * h for w, h in px) / 1e6:.2f}-"
          f"{max(w * h for w, h in px) / 1e6:.2f} MP), resized to {args.size} px; "
          f"{args.records} samples per run, batch {args.batch_size}, {torch.get_num_threads()} torch thread(s), "
          f"pinned: {'yes' if torch.cuda.is_available() else 'no (no CUDA; pinning needs a GPU)'}")
    print(f"  PIL decode+resize limit, full decode : {full:8.1f} images/s")
    print(f"  PIL decode+resize limit, JPEG draft  : {fast:8.1f} images/s ({fast / full:.2f}x); draft vs full after "
          f"resize: mean |diff| {mean_d:.2f}/255, max {max_d:.0f}/255, PSNR {psnr:.1f} dB")
    print(f"  {'pipeline (shards -> stream -> batcher)':<44} {'samples/s':>10} {'per worker':>11} {'of limit':>9}")
    for (workers, draft), rate in runs.items():
        lim = fast if draft else full
        per = rate / max(workers, 1)
        name = f"{workers} worker(s), {'draft' if draft else 'full'} decode"
        print(f"  {name:<44} {rate:>10.1f} {per:>11.1f} {100 * per / lim:>8.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
