"""Can stage align make the demo's small LM read the image? Caption loss per word, real image vs blank.

    python scripts/probe_demo_align.py --out /tmp/probe_align [--captions 3000]
        [--frozen-steps 1500 --frozen-lr 1e-2] [--unfrozen-steps 600 --unfrozen-lr 1e-3]
        [--describe-scenes 20000 [--describe-lr 1e-3]]

Draws `--captions` caption records of the demo's scenes (mmtune.data.synthetic,
a seed the pool, eval sets and pretraining corpora do not use), trains two
align runs of the demo's model (mmtune/assets/demo_mllm.yaml, LLaVA's `plain`
template) through `mmtune.train.run.train`:

  - LLaVA's stage 1: the projector only, tower and LM frozen;
  - `train.unfreeze_lm=true`: the LM trains beside the projector.

Then, on 64 new captions, it prints each run's mean loss (nats) on the colour
words and the shape words of the caption, with the real image and with a
blank one. A loss at the blank image's level (or at chance: ln 6 = 1.79 for
six colours, ln 3 = 1.10 for three shapes) says the image did not get through.

`--describe-scenes N` adds a third run, closer to LLaVA's scale of stage 1
(one pass over many images, none seen twice): the LM unfrozen, on N fresh
scenes of one to three shapes, each captioned left to right with its count
("two shapes: a red circle left of a blue square",
`mmtune.data.synthetic.describe_scene`). It prints how many of `--test-scenes` (100)
new two-shape scenes (the shapes in different columns) the run captions exactly,
greedy, and how many with the right objects in the right order. Its
run, `OUT/describe`, is what `scripts/probe_demo_task.py --align-from`
starts a task from: does a model that reads the scene learn to
answer questions about it?
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

CAPTION_SEED = 940_004  # not the pool's, the eval sets', the probes' or the pretraining corpora's


def caption_shards(out: Path, n: int, seed: int) -> Path:
    from mmtune.data.schema import write_records
    from mmtune.data.shards import write_shards
    from mmtune.data.synthetic import make_pool

    recs = make_pool(out, per_task=n, tasks=("caption",), seed=seed, id_prefix="cap")
    write_records(recs, out / "captions.jsonl")
    write_shards(out / "captions.jsonl", out / "shards", max_count=512, overwrite=True, progress=False)
    return out / "shards"


def train_align(out: Path, shards: Path, steps: int, lr: float, unfreeze_lm: bool,
                projector_lr: float | None = None) -> Path:
    from mmtune.config import RunConfig, load_config
    from mmtune.demo import DEMO_CONFIG, base_overrides
    from mmtune.train.run import train

    cfg = load_config(DEMO_CONFIG, RunConfig, [
        *base_overrides(), "train.stage=align", f"train.unfreeze_lm={str(unfreeze_lm).lower()}",
        f"train.max_steps={steps}", f"train.lr={lr}", f"train.output_dir={out}", "train.progress=false",
        f"data.train=[{shards}]", "data.template=plain",
        *([f"train.projector_lr={projector_lr}"] if projector_lr is not None else [])])
    train(cfg)
    return out


def scene_record(out: Path, rid: str, things: list) -> Any:
    """A caption record: the scene drawn to `out/images/RID.png`, captioned left to right with its count."""
    from mmtune.data.schema import IMAGE_PLACEHOLDER, Record
    from mmtune.data.synthetic import describe_scene, draw_scene

    path = out / "images" / f"{rid}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_scene(things).save(path)
    return Record(id=rid, images=[str(path.resolve())], source="probe_demo_align",
                  messages=[{"role": "user", "content": IMAGE_PLACEHOLDER},
                            {"role": "assistant", "content": describe_scene(things)}])


def describe_shards(out: Path, n: int, seed: int) -> Path:
    """`n` fresh grid scenes of 1-3 shapes, each with its left-to-right description (the `plain` template
    keeps only the image and the caption)."""
    import random

    from tqdm import tqdm

    from mmtune.data.schema import write_records
    from mmtune.data.shards import write_shards
    from mmtune.data.synthetic import _scene

    rng = random.Random(seed)
    recs = [scene_record(out, f"scene-{i:06d}", _scene(rng, rng.randint(1, 3), distinct_shapes=False))
            for i in tqdm(range(n), desc="drawing scenes", unit="scene")]
    write_records(recs, out / "scenes.jsonl")
    write_shards(out / "scenes.jsonl", out / "shards", max_count=1024, overwrite=True, progress=False)
    return out / "shards"


def exact_captions(run: Path, out: Path, seed: int, n: int = 100) -> tuple[int, int]:
    """Greedy captions of `n` new two-shape scenes (different columns): (exact, right objects in right order)."""
    import random
    import re

    from mmtune.data.synthetic import _scene
    from mmtune.eval.generate import generate_answers
    from mmtune.model.io import load_model

    rng = random.Random(seed)
    recs = []
    while len(recs) < n:
        things = _scene(rng, 2)
        if things[0].cell != things[1].cell:
            recs.append(scene_record(out, f"test-{len(recs):03d}", things))
    truths = [r.messages[-1]["content"] for r in recs]
    answers = generate_answers(load_model(run), recs, "plain", max_new_tokens=24)  # prompted up to the caption

    def objects(text: str) -> list[tuple[str, str]]:
        return re.findall(r"a (\w+) (\w+)", text)

    exact = sum(a.strip() == t for a, t in zip(answers, truths, strict=True))
    ordered = sum(objects(a) == objects(t) for a, t in zip(answers, truths, strict=True))
    return exact, ordered


def word_losses(run: Path, records: list) -> dict[str, dict[str, float]]:
    """Mean loss of the caption's colour and shape words, with the real image and a blank one."""
    from PIL import Image

    from mmtune.data.encode import tokenize_record
    from mmtune.data.images import load_image
    from mmtune.data.synthetic import COLOURS, SHAPES
    from mmtune.data.templates import get_template
    from mmtune.model.io import load_model

    bundle = load_model(run)
    model, tok = bundle.model.eval(), bundle.tokenizer
    template = get_template("plain", tok)
    kind_of = {**{f" {c}": "colour" for c in COLOURS}, **{f" {s}": "shape" for s in SHAPES}}
    blank = Image.new("RGB", (64, 64), (245, 245, 240))
    sums: dict[str, dict[str, list[float]]] = {"real": {"colour": [], "shape": []}, "blank": {"colour": [], "shape": []}}
    for rec in records:
        ex = tokenize_record(rec, tok, template, max_length=256, num_image_tokens=bundle.num_image_tokens)
        ids = torch.tensor([ex.input_ids])  # [1, T]
        target = torch.tensor(ex.labels[1:])  # [T-1]
        for image_kind, image in (("real", load_image(rec.images[0])), ("blank", blank)):
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=bundle.image_transform(image)[None]).logits[0, :-1]  # [T-1, V]
            logp = torch.log_softmax(logits.float(), -1)
            for pos, t in enumerate(target.tolist()):
                kind = kind_of.get(tok.decode([t])) if t != -100 else None
                if kind:
                    sums[image_kind][kind].append(-float(logp[pos, t]))
    return {k: {w: float(np.mean(v)) for w, v in d.items()} for k, d in sums.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="working folder (refused if it exists and is not empty)")
    ap.add_argument("--captions", type=int, default=3000)
    ap.add_argument("--frozen-steps", type=int, default=1500)
    ap.add_argument("--frozen-lr", type=float, default=1e-2)
    ap.add_argument("--unfrozen-steps", type=int, default=600)
    ap.add_argument("--unfrozen-lr", type=float, default=1e-3)
    ap.add_argument("--describe-scenes", type=int, default=0,
                    help="also align with the LM unfrozen on this many fresh described scenes, one pass (0: skip)")
    ap.add_argument("--describe-lr", type=float, default=1e-3, help="the LM's rate there (the projector's: 2x)")
    ap.add_argument("--test-scenes", type=int, default=100, help="new two-shape scenes it captions")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        ap.error(f"{out} exists and is not empty; choose another --out")  # exits 2, nothing written
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from mmtune.data.synthetic import make_pool

    shards = caption_shards(out / "captions", args.captions, CAPTION_SEED)
    test = make_pool(out / "test", per_task=64, tasks=("caption",), seed=CAPTION_SEED + 1, id_prefix="test")
    runs = {
        f"projector only (LLaVA), {args.frozen_steps} steps, lr {args.frozen_lr:g}":
            train_align(out / "frozen_lm", shards, args.frozen_steps, args.frozen_lr, False),
        f"train.unfreeze_lm, {args.unfrozen_steps} steps, lr {args.unfrozen_lr:g}":
            train_align(out / "unfrozen_lm", shards, args.unfrozen_steps, args.unfrozen_lr, True),
    }
    print(f"\ncaption loss per word on 64 new scenes, nats (chance: colour ln 6 = {math.log(6):.2f}, "
          f"shape ln 3 = {math.log(3):.2f})")
    print(f"{'align run':<48} {'colour real':>11} {'blank':>7} {'shape real':>11} {'blank':>7}")
    for name, run in runs.items():
        r = word_losses(run, test)
        print(f"{name:<48} {r['real']['colour']:>11.2f} {r['blank']['colour']:>7.2f} "
              f"{r['real']['shape']:>11.2f} {r['blank']['shape']:>7.2f}")
    if args.describe_scenes:
        steps = -(-args.describe_scenes // 16)  # one pass at the demo's batch of 16
        shards = describe_shards(out / "scenes", args.describe_scenes, CAPTION_SEED + 2)
        run = train_align(out / "describe", shards, steps, args.describe_lr, True, projector_lr=2 * args.describe_lr)
        exact, ordered = exact_captions(run, out / "describe_test", CAPTION_SEED + 3, args.test_scenes)
        print(f"\ntrain.unfreeze_lm on {args.describe_scenes} fresh described scenes, {steps} steps (one pass), "
              f"lr {args.describe_lr:g}: {args.test_scenes} new two-shape scenes captioned exactly: {exact}; right objects in the "
              f"right order: {ordered}\n  for scripts/probe_demo_task.py --align-from: {run}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
