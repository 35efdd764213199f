"""An embedded instruction pool that needs no download: drawn scenes and text tasks.

Images are drawn with PIL: a few coloured shapes at positions on a plain
background. Image tasks ask about them (colour of a shape, shape of a colour,
count, left/right, existence, a one-phrase caption); text-only tasks are the
arithmetic example instruction tuning is usually introduced with ("1+2=?"),
string reversal and word-level tasks. Every task has several instruction
phrasings, so evaluation can hold out whole tasks and unseen phrasings of
seen tasks. This is mmtune's own demo data, hence written here by hand.

Every record carries `task`, `answers` (the answer repeated ten times, as in
a VQA question all ten annotators agreed on) and `meta.phrasing`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mmtune.data.schema import IMAGE_PLACEHOLDER, Record

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 40),
    "purple": (145, 60, 175),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
WORDS = (
    "cat dog sun tree book milk rain star fish bird lamp door road ship cake ball "
    "moon king rose wind fire snow leaf hand bell coin frog kite nest rock wolf"
).split()
NUM_WORDS = {1: "one", 2: "two", 3: "three"}

# Each task: phrasings (the last one is the held-out "unseen phrasing" by convention).
PHRASINGS: dict[str, list[str]] = {
    "colour": ["What colour is the {shape}?", "Which colour does the {shape} have?", "Tell me the colour of the {shape}.", "The {shape} is what colour?"],
    "shape": ["Which shape is {colour}?", "What is the {colour} shape?", "Name the shape that is {colour}.", "The {colour} object is which shape?"],
    "count": ["How many {shape}s are there?", "Count the {shape}s in the picture.", "What is the number of {shape}s?", "How many {shape}s can you see?"],
    "position": ["Is the {a} on the left or on the right of the {b}?", "Is the {a} left or right of the {b}?", "Where is the {a} relative to the {b}, left or right?", "Relative to the {b}, is the {a} left or right?"],
    "exists": ["Is there a {colour} {shape} in the picture?", "Does the image contain a {colour} {shape}?", "Can you see a {colour} {shape}?", "Is a {colour} {shape} shown?"],
    "caption": ["Describe the picture in a few words.", "Give a short caption for the image.", "What does the image show? Answer in a phrase.", "Caption this picture briefly."],
    "add": ["What is {a}+{b}?", "{a}+{b}=?", "Add {a} and {b}.", "Compute the sum of {a} and {b}."],
    "reverse": ["Reverse the word {w}.", "Write {w} backwards.", "Spell {w} in reverse order.", "What is {w} reversed?"],
    "upper": ["Write {w} in capital letters.", "Convert {w} to upper case.", "Give {w} in uppercase.", "Capitalise every letter of {w}."],
    "first_letter": ["What is the first letter of {w}?", "Which letter does {w} start with?", "Give the initial letter of {w}.", "{w} begins with which letter?"],
}
IMAGE_TASKS = ("colour", "shape", "count", "position", "exists", "caption")
TEXT_TASKS = ("add", "reverse", "upper", "first_letter")


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    cell: int  # column 0..2, left to right
    row: int


def draw_scene(things: list[Thing], size: int = 64) -> Image.Image:
    """Draw shapes on a light background in a 3x2 grid of cells."""
    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    cw, ch = size / 3, size / 2
    r = min(cw, ch) * 0.36
    for t in things:
        cx, cy = cw * (t.cell + 0.5), ch * (t.row + 0.5)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[t.colour]
        if t.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif t.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _scene(rng: random.Random, n: int, *, distinct_shapes: bool = True) -> list[Thing]:
    cells = rng.sample([(c, r) for c in range(3) for r in range(2)], n)
    shapes = rng.sample(SHAPES, n) if distinct_shapes else [rng.choice(SHAPES) for _ in range(n)]
    colours = rng.sample(list(COLOURS), n)
    return [Thing(s, c, cell, row) for s, c, (cell, row) in zip(shapes, colours, cells, strict=True)]


def _caption(things: list[Thing]) -> str:
    ordered = sorted(things, key=lambda t: (t.cell, t.row))
    return " and ".join(f"a {t.colour} {t.shape}" for t in ordered)


def _image_example(task: str, rng: random.Random) -> tuple[list[Thing], dict[str, str], str]:
    if task == "colour":
        things = _scene(rng, rng.randint(1, 2))
        t = rng.choice(things)
        return things, {"shape": t.shape}, t.colour
    if task == "shape":
        things = _scene(rng, rng.randint(1, 2))
        t = rng.choice(things)
        return things, {"colour": t.colour}, t.shape
    if task == "count":
        shape = rng.choice(SHAPES)
        n = rng.randint(1, 3)
        things = [Thing(shape, c, cell, row) for c, (cell, row) in zip(
            rng.sample(list(COLOURS), n), rng.sample([(c, r) for c in range(3) for r in range(2)], n), strict=True)]
        others = [s for s in SHAPES if s != shape]
        free = [(c, r) for c in range(3) for r in range(2) if all((t.cell, t.row) != (c, r) for t in things)]
        if free and rng.random() < 0.5:
            cell, row = rng.choice(free)
            things.append(Thing(rng.choice(others), rng.choice(list(COLOURS)), cell, row))
        return things, {"shape": shape}, str(n)
    if task == "position":
        while True:
            things = _scene(rng, 2)
            a, b = things
            if a.cell != b.cell:
                break
        return things, {"a": f"{a.colour} {a.shape}", "b": f"{b.colour} {b.shape}"}, "left" if a.cell < b.cell else "right"
    if task == "exists":
        things = _scene(rng, rng.randint(1, 2))
        if rng.random() < 0.5:
            t = rng.choice(things)
            return things, {"colour": t.colour, "shape": t.shape}, "yes"
        present = {(t.shape, t.colour) for t in things}
        absent = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in present]
        s, c = rng.choice(absent)
        return things, {"colour": c, "shape": s}, "no"
    if task == "caption":
        things = _scene(rng, rng.randint(1, 2))
        return things, {}, _caption(things)
    raise ValueError(f"unknown image task {task!r}")


def _text_example(task: str, rng: random.Random) -> tuple[dict[str, str], str]:
    if task == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return {"a": str(a), "b": str(b)}, str(a + b)
    w = rng.choice(WORDS)
    if task == "reverse":
        return {"w": w}, w[::-1]
    if task == "upper":
        return {"w": w}, w.upper()
    if task == "first_letter":
        return {"w": w}, w[0]
    raise ValueError(f"unknown text task {task!r}")


def make_pool(
    out_dir: str | Path,
    *,
    per_task: int = 300,
    tasks: tuple[str, ...] = IMAGE_TASKS + TEXT_TASKS,
    image_size: int = 64,
    seed: int = 0,
    phrasings: tuple[int, ...] | None = None,
    id_prefix: str = "syn",
    progress: Callable[[int], None] | None = None,
) -> list[Record]:
    """Draw `per_task` records for each task; images go to `out_dir/images/`.

    `phrasings` restricts which phrasing indices are used (None = all).
    Deterministic for a seed.
    """
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records: list[Record] = []
    for task in tasks:
        allowed = list(phrasings) if phrasings is not None else list(range(len(PHRASINGS[task])))
        for i in range(per_task):
            rid = f"{id_prefix}-{task}-{i:05d}"
            p = rng.choice(allowed)
            if task in IMAGE_TASKS:
                things, slots, answer = _image_example(task, rng)
                path = img_dir / f"{rid}.png"
                draw_scene(things, image_size).save(path, optimize=True)
                question = PHRASINGS[task][p].format(**slots)
                content = f"{IMAGE_PLACEHOLDER}\n{question}"
                images = [str(path)]
                cluster = "vision"
            else:
                slots, answer = _text_example(task, rng)
                content = PHRASINGS[task][p].format(**slots)
                images = []
                cluster = "text"
            records.append(Record(
                id=rid,
                messages=[{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
                images=images, source="mmtune-synthetic", task=task, answers=[answer] * 10,
                meta={"phrasing": p, "cluster": cluster},
            ))
            if progress is not None:
                progress(1)
    return records
