"""Loader throughput: shards -> ExampleStream -> Batcher -> pinned tensors, next to PIL's decode-and-resize limit.

Real JPEGs (the COCO / GQA / Visual Genome / LLaMA-Factory images in
`../shared/data`, see its README) are written as `mmtune shard` webdataset
shards, one image per record with a short question and answer, repeated to
`--records` samples. In one process and one run, the script measures:

1. the limit: PIL decode + RGB + resize to `--size` px (bicubic) of the same
   JPEG bytes, images/s, decoding in full and with JPEG draft mode
   (`Image.draft`, libjpeg DCT scaling to a size >= `--size`), and the pixel
   difference draft vs full decode after the resize (mean and max absolute
   difference in 0-255 units, PSNR);
   Next to it, LLaVA-1.5's own preprocessing done the way its training code
   does it in PIL: decode, `expand2square` with the mean colour, resize. That
   is the decode-and-resize of the pixels the model is trained on (the squash
   of (1) makes different ones), so the pipeline is reported against both;
2. the tower's own work: decode + its loader transform (pad to square with
   the mean colour, LLaVA-1.5's "pad", + resize + uint8 tensor), the least
   any loader giving the model its exact pixels must do. The padded canvas
   is larger than the photo; `pad_resize` (mmtune/data/images.py) resamples
   only the outputs that reach the photo, so this costs about what (1) does;
3. the whole path the trainer runs per process: webdataset shards read and
   shuffled by `ExampleStream`, records tokenized (byte-level BPE), images
   decoded and transformed by the tower's loader transform
   (`ModelBundle.pixel_transform`: pad to square, resize, uint8 tensor; the
   tower normalises on the device), `Batcher` (collation; length grouping
   off, since its buffer would serve batches from memory), the batch pinned
   (CUDA only; pinning needs a GPU) -- with 0 workers (the main process does
   it all) and `--workers` DataLoader workers, full and draft decode; and,
   for comparison, with the float transform (`ModelBundle.image_transform`:
   normalised on the CPU, as the loader did before it shipped uint8).

Figures are medians over `--rounds` interleaved rounds, each reported two
ways: wall-clock samples/s, and samples per CPU-second of the process doing
the work (the main process with 0 workers, the worker processes with
workers; psutil reads their CPU time). On a machine shared with other jobs
the CPU-time figure is the stable one: a worker's efficiency does not depend
on whether the scheduler gave it a core. "Per worker" with workers is
therefore samples per worker-CPU-second (what one worker delivers with a core
to itself) next to the wall-clock rate / workers. Target: pipeline per worker
>= 90% of the limit (1) (column "% limit"); LLaVA's padded decode-and-resize
("% LLaVA") and (2) ("% tower") are printed next to it. A CPU-second buys less
when several processes compute at once (shared caches and memory bandwidth,
other jobs on the host), so the limits are also measured with `--workers`
processes running them at once, and the worker rows say which share of that
per-process limit they reach (last column); the headline stays against (1)
measured alone. The load average is printed before and after.

    python scripts/bench_loader.py                       # needs ../shared/data
    python scripts/bench_loader.py --records 400 --workers 2 --rounds 5
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


def llava_pad_resize(data: bytes, size: int, draft: bool, background: tuple[int, int, int]) -> Any:
    """Decode + LLaVA-1.5's own preprocessing in PIL: `expand2square` with the mean colour, then the resize."""
    from PIL import Image

    from mmtune.data.images import expand_to_square

    with Image.open(io.BytesIO(data)) as img:
        if draft:
            img.draft("RGB", (size, size))
        return expand_to_square(img.convert("RGB"), background).resize((size, size), Image.BICUBIC)


def tower_pixels(data: bytes, size: int, draft: bool, transform: Any) -> Any:
    """Decode + the tower's loader transform (pad to square, resize, uint8 tensor): the pixels the model needs."""
    from mmtune.data.images import load_image

    return transform(load_image(data, draft_size=size if draft else None))


def resize_alone(images: list[Any], size: int, background: tuple[int, int, int], reps: int) -> dict[str, float]:
    """CPU ms per image of the resize alone, on decoded images: the squash, LLaVA's expand2square +
    resize, and `pad_resize` (the same pixels as LLaVA's), over all images, the wide and the tall ones."""
    from PIL import Image

    from mmtune.data.images import expand_to_square, pad_resize

    works = {"squash": lambda im: im.resize((size, size), Image.BICUBIC),
             "LLaVA's": lambda im: expand_to_square(im, background).resize((size, size), Image.BICUBIC),
             "pad_resize": lambda im: pad_resize(im, background, size)}
    groups = {"all": images, "wide": [im for im in images if im.width > im.height],
              "tall": [im for im in images if im.height > im.width]}
    best = {f"{g} {w}": math.inf for g in groups for w in works}
    for _ in range(reps):  # interleaved, so that load from other processes hits every figure alike
        for gname, group in groups.items():
            for wname, work in works.items():
                c = time.process_time()
                for im in group:
                    work(im)
                key = f"{gname} {wname}"
                best[key] = min(best[key], (time.process_time() - c) / max(len(group), 1))
    return {k: 1000 * v for k, v in best.items()}


def limit(blobs: list[bytes], work: Any, reps: int) -> tuple[float, float]:
    """(images/s wall, images per CPU-second) of `work(blob)`, best of `reps` passes over all images."""
    wall = cpu = math.inf
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        for b in blobs:
            work(b)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return len(blobs) / wall, len(blobs) / cpu


_SHARED_WORK: dict[Any, Any] = {}  # what forked limit processes run (set before forking; closures do not pickle)


def _limit_in_child(key: Any) -> tuple[float, float]:
    blobs, work, reps = _SHARED_WORK[key]
    return limit(blobs, work, reps)


def concurrent_limit(blobs: list[bytes], work: Any, reps: int, procs: int) -> tuple[float, float]:
    """`limit` run in `procs` processes at once (forked), averaged per process: what one of `procs`
    DataLoader workers could do at most while the others work too (on a machine whose cores share
    caches and memory bandwidth, or are busy with other jobs, that is less than one process alone)."""
    import multiprocessing as mp

    key = id(work)
    _SHARED_WORK[key] = (blobs, work, reps)
    try:
        with mp.get_context("fork").Pool(procs) as pool:
            got = pool.map(_limit_in_child, [key] * procs, chunksize=1)
    finally:
        _SHARED_WORK.pop(key, None)
    return statistics.mean(g[0] for g in got), statistics.mean(g[1] for g in got)


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


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its live child processes (DataLoader workers)."""
    import psutil

    me = psutil.Process()
    own = sum(me.cpu_times()[:2])
    kids = 0.0
    for child in me.children(recursive=True):
        try:
            kids += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return own, kids


def pipeline(shards: str, bundle: Any, transform: Any, args: argparse.Namespace, workers: int,
             draft: bool) -> tuple[float, float, float]:
    """(samples/s wall, main-process CPU s / sample, worker CPU s / sample) through
    ExampleStream -> Batcher -> pinned tensors, after a warm-up batch."""
    from mmtune.data.batching import Batcher
    from mmtune.data.stream import ExampleStream

    stream = ExampleStream(shards, bundle.tokenizer, "vicuna_v1", max_length=1024,
                           num_image_tokens=bundle.num_image_tokens, image_transform=transform,
                           shuffle=True, shuffle_buffer=64, seed=0, epochs=None, num_workers=workers,
                           prefetch_factor=args.prefetch if workers else None,
                           draft_size=args.size if draft else None)
    # No length grouping: its buffer (batch x group_factor examples) is filled before the first batch
    # and then served from memory, which would time the buffer, not the decoding.
    batcher = Batcher(stream, batch_size=args.batch_size, pad_token_id=bundle.tokenizer.pad_token_id,
                      group_by_length=False, seed=0, pin_memory=torch.cuda.is_available())
    it = iter(batcher)
    next(it)  # workers started, first batch out
    n, t, (own, kids) = 0, time.perf_counter(), cpu_seconds()
    while n < args.records:
        n += len(next(it)["ids"])
    wall = time.perf_counter() - t
    own2, kids2 = cpu_seconds()
    del it  # workers shut down
    return n / wall, (own2 - own) / n, (kids2 - kids) / n


def real_tokenizer(path: Path | None) -> Any:
    """LLaVA-1.5's own tokenizer (Llama-2 + `<image>`, from ../shared/data/tokenizers), made ready as training does."""
    from mmtune.data.tokenizer import load_tokenizer, prepare_tokenizer

    return prepare_tokenizer(load_tokenizer(path)) if path is not None and path.is_dir() else None


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
    parser.add_argument("--reps", type=int, default=3, help="passes for the PIL limit in a round (best is kept)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all measurements (median kept)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "llava-1.5-7b-hf",
                        help="tokenizer folder the records are tokenized with (default: LLaVA-1.5's, from "
                             "../shared/data/tokenizers; the tiny model's byte-level BPE when absent)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if not args.images.is_dir():
        raise SystemExit(f"{args.images}: not found (the real JPEGs live in ../shared/data; see its README)")
    jpegs = find_jpegs(args.images)
    if not jpegs:
        raise SystemExit(f"{args.images}: no JPEG found")
    from mmtune.data.shards import write_shards

    blobs = [p.read_bytes() for p in jpegs]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mmtune-bench-loader-") as tmp:
        records = Path(tmp) / "records.jsonl"
        write_records(jpegs, max(args.records, 4 * len(jpegs)), records)
        write_shards(records, Path(tmp) / "shards", max_count=100, progress=False)
        shards = str(Path(tmp) / "shards" / "*.tar")
        bundle = tiny_bundle(args.size)
        tokenizer = real_tokenizer(args.tokenizer)
        if tokenizer is not None:  # only the loader runs: the tiny model's vocabulary does not matter
            bundle.tokenizer = tokenizer
        mean_d, max_d, psnr = draft_difference(blobs, args.size)
        from mmtune.data.images import background_from_mean

        background = background_from_mean(bundle.model.vision.image_mean)
        limits = {
            ("squash", False): lambda b: decode_resize(b, args.size, False),
            ("squash", True): lambda b: decode_resize(b, args.size, True),
            ("llava", False): lambda b: llava_pad_resize(b, args.size, False, background),
            ("llava", True): lambda b: llava_pad_resize(b, args.size, True, background),
            ("tower", False): lambda b: tower_pixels(b, args.size, False, bundle.pixel_transform),
            ("tower", True): lambda b: tower_pixels(b, args.size, True, bundle.pixel_transform),
        }
        runs = [(w, "uint8", d) for w in (0, args.workers) for d in (False, True)]
        runs += [(w, "float on CPU", False) for w in (0, args.workers)]
        lim: dict[Any, list[tuple[float, float]]] = {k: [] for k in limits}
        # the same limits with `workers` processes decoding at once: the per-worker ceiling
        together: dict[Any, list[tuple[float, float]]] = {k: [] for k in limits}
        res: dict[Any, list[tuple[float, float, float]]] = {k: [] for k in runs}
        from mmtune.data.images import load_image

        decoded = [load_image(b) for b in blobs]
        resizes: list[dict[str, float]] = []
        # Rounds interleave every measurement and each figure is the median over rounds, so load
        # from other processes on a shared machine hits the limits and the pipeline alike.
        for _ in range(args.rounds):
            for key, work in limits.items():
                lim[key].append(limit(blobs, work, args.reps))
                if args.workers > 1:
                    together[key].append(concurrent_limit(blobs, work, args.reps, args.workers))
            resizes.append(resize_alone(decoded, args.size, background, args.reps))
            for key in runs:
                workers, kind, draft = key
                transform = bundle.pixel_transform if kind == "uint8" else bundle.image_transform
                res[key].append(pipeline(shards, bundle, transform, args, workers, draft))
    load_after = os.getloadavg()

    def med(values: list[tuple[float, ...]], i: int) -> float:
        return statistics.median(v[i] for v in values)

    from PIL import Image

    px = [Image.open(io.BytesIO(b)).size for b in blobs]
    print(f"loader benchmark: {len(jpegs)} real JPEGs from {args.images} ({min(w * h for w, h in px) / 1e6:.2f}-"
          f"{max(w * h for w, h in px) / 1e6:.2f} MP), resized to {args.size} px; "
          f"{args.records} samples per run, batch {args.batch_size}, {torch.get_num_threads()} torch thread(s), "
          f"{os.cpu_count()} CPU(s), tokenizer {args.tokenizer if tokenizer is not None else 'tiny byte-level BPE'}, "
          f"pinned: {'yes' if torch.cuda.is_available() else 'no (no CUDA; pinning needs a GPU)'}")
    print(f"  load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}; medians of {args.rounds} rounds")
    print(f"  {'limit (images/s)':<52} {'wall':>8} {'per CPU-s':>10}")
    names = {"squash": "PIL decode+resize", "llava": "PIL decode+expand2square+resize (LLaVA's)",
             "tower": "decode + tower transform (pad, resize, uint8)"}
    for (kind, draft), v in lim.items():
        print(f"  {names[kind] + (', JPEG draft' if draft else ', full decode'):<52} {med(v, 0):>8.1f} {med(v, 1):>10.1f}")
    if args.workers > 1:
        for (kind, draft), v in together.items():
            name = f"{names[kind]}, {'JPEG draft' if draft else 'full decode'}, {args.workers} processes at once"
            print(f"  {name:<52} {med(v, 0):>8.1f} {med(v, 1):>10.1f}   (per process)")
    full, fast = med(lim[("squash", False)], 1), med(lim[("squash", True)], 1)
    counts = f"{sum(im.width > im.height for im in decoded)} wide, {sum(im.height > im.width for im in decoded)} tall"
    print(f"  resize alone, decoded images ({counts}), CPU ms per image: " + ", ".join(
        f"{k} {statistics.median(r[k] for r in resizes):.2f}" for k in resizes[0]))
    print(f"  JPEG draft: {fast / full:.2f}x on the limit; draft vs full after resize: mean |diff| {mean_d:.2f}/255, "
          f"max {max_d:.0f}/255, PSNR {psnr:.1f} dB")
    # The ceiling of the "% limit" column: a loader that did nothing but make the tower's exact pixels (no
    # shard reading, no tokenization, no collation) would reach this share of the squash limit.
    print(f"  ceiling: decode + the tower transform alone is {100 * med(lim[('tower', False)], 1) / full:.0f}% of the "
          f"squash limit (full decode; {100 * med(lim[('tower', True)], 1) / fast:.0f}% with draft): no loader "
          "giving the model its exact padded pixels can exceed that")
    print(f"  {'pipeline (shards -> stream -> batcher)':<40} {'samples/s':>9} {'/worker':>8} {'wall %':>7} "
          f"{'worker CPU-s':>12} {'per CPU-s':>9} {'% limit':>8} {'% LLaVA':>8} {'% tower':>8} {'main CPU-s':>10} "
          f"{'% limit, N at once':>18}")
    for key, v in res.items():
        workers, kind, draft = key
        rate, main_cpu, worker_cpu = med(v, 0), med(v, 1), med(v, 2)
        cpu_per = main_cpu if workers == 0 else worker_cpu  # CPU seconds per sample where the work is done
        per_wall = rate / max(workers, 1)
        lim_wall, lim_cpu = med(lim[("squash", draft)], 0), med(lim[("squash", draft)], 1)
        tower_cpu, llava_cpu = med(lim[("tower", draft)], 1), med(lim[("llava", draft)], 1)
        name = f"{workers} worker(s), {kind}, {'draft' if draft else 'full'}"
        at_once = (f"{100 / cpu_per / med(together[('squash', draft)], 1):>17.0f}%"
                   if workers > 1 and together[("squash", draft)] else f"{'-':>18}")
        print(f"  {name:<40} {rate:>9.1f} {per_wall:>8.1f} {100 * per_wall / lim_wall:>6.0f}% "
              f"{1000 * cpu_per:>10.2f}ms {1 / cpu_per:>9.1f} {100 / cpu_per / lim_cpu:>7.0f}% "
              f"{100 / cpu_per / llava_cpu:>7.0f}% {100 / cpu_per / tower_cpu:>7.0f}% {1000 * main_cpu if workers else 0:>8.2f}ms {at_once}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
