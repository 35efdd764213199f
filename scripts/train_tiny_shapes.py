"""Train a tiny LLaVA-style MLLM from scratch on CPU and check that it learned: shapes and colours.

    python scripts/train_tiny_shapes.py [--out runs/tiny_shapes] [--steps 500] [--seed 0]

Data: 108 drawn 32x32 images (6 colours x 3 shapes x 6 positions, one large shape each), each asked
"What colour is the shape?" and "What shape is this?" (216 records, written
under OUT/data). Model: configs/tiny_mllm.yaml (random 2-block ViT, MLP
projector, 2-layer Llama of width 64, byte-level BPE), stage instruct with the
tower unfrozen, since a random frozen tower has nothing useful to align to.

Passes (exit 0) when the loss of the last 20 steps is under a fifth of the
first 20 and greedy answers to the training questions are right for at least
90% of them; prints both. About 2-5 minutes on one CPU core. The slow test
`tests/test_train_slow.py` runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]

SYSTEM = "Answer with one word."
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is this?"}
SHIFTS = [(dx, dy) for dx in (-4, 0, 4) for dy in (-2, 2)]


def draw(colour: tuple[int, int, int], shape: str, dx: int, dy: int, size: int = 32) -> Image.Image:
    """One large shape on a light background, shifted by (dx, dy) pixels."""
    img = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(img)
    c, r = size / 2, size * 0.3
    x, y = c + dx, c + dy
    box = (x - r, y - r, x + r, y + r)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    return img


def make_data(out: Path) -> Path:
    """Write the images and records; returns the records file."""
    from mmtune.data.schema import IMAGE_PLACEHOLDER, Record, write_records
    from mmtune.data.synthetic import COLOURS, SHAPES

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for dx, dy in SHIFTS:
                name = f"{colour}_{shape}_{dx:+d}{dy:+d}"
                path = images / f"{name}.png"
                draw(rgb, shape, dx, dy).save(path)
                for task, question in QUESTIONS.items():
                    answer = colour if task == "colour" else shape
                    records.append(Record(
                        id=f"{task}-{name}", images=[str(path)], task=task, answers=[answer],
                        messages=[{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"},
                                  {"role": "assistant", "content": answer}]))
    path = out / "shapes.jsonl"
    write_records(records, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/tiny_shapes", help="folder for data and the run")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    args = parser.parse_args(argv)

    import torch

    from mmtune.config import RunConfig, load_config
    from mmtune.data.schema import read_records
    from mmtune.eval.generate import generate_answers
    from mmtune.model.io import load_model
    from mmtune.train.metrics import read_metrics
    from mmtune.train.run import train

    torch.set_num_threads(1)
    out = Path(args.out)
    data = make_data(out / "data")
    run_dir = out / "run"
    cfg = load_config(REPO / "configs" / "tiny_mllm.yaml", RunConfig, [
        f"data.train=[{data}]", f"model.tokenizer.train_files=[{data}]", "data.image_root=null",
        "data.max_length=96", "data.shuffle_buffer=256",
        f"train.output_dir={run_dir}", f"train.max_steps={args.steps}", f"train.seed={args.seed}",
        "train.batch_size=16", "train.lr=2e-3", "train.warmup_ratio=0.05", "train.unfreeze_vision=true",
        "train.log_every=1", "train.save_every=0", "train.save_total_limit=1",
    ])
    t0 = time.time()
    result = train(cfg)
    minutes = (time.time() - t0) / 60

    rows = read_metrics(run_dir / "metrics.jsonl")
    first = sum(r["loss"] for r in rows[:20]) / min(20, len(rows))
    last = sum(r["loss"] for r in rows[-20:]) / min(20, len(rows))

    bundle = load_model(run_dir)
    records = read_records(data)
    answers = generate_answers(bundle, records, cfg.data.template, batch_size=54, max_new_tokens=6)
    right = [a.strip().strip(".").lower() == r.answers[0] for a, r in zip(answers, records, strict=True)]
    accuracy = sum(right) / len(right)
    by_task = {t: sum(ok for ok, r in zip(right, records, strict=True) if r.task == t) /
               sum(1 for r in records if r.task == t) for t in QUESTIONS}
    wrong = [(r.id, a) for ok, a, r in zip(right, answers, records, strict=True) if not ok][:5]

    summary = {"steps": result.step, "minutes": round(minutes, 2), "loss_first20": round(first, 4),
               "loss_last20": round(last, 4), "accuracy": round(accuracy, 4),
               "accuracy_by_task": {k: round(v, 4) for k, v in by_task.items()}, "examples_wrong": wrong}
    print(json.dumps(summary, indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    ok = last < first / 5 and accuracy >= args.min_accuracy
    print(f"tiny shapes: loss {first:.3f} -> {last:.3f}, training-question accuracy {accuracy:.1%} "
          f"in {minutes:.1f} min: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
