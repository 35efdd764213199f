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

# Each task: N_PHRASINGS phrasings; the last one is the held-out "unseen phrasing" by convention.
N_PHRASINGS = 4
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
    "last_letter": ["What is the last letter of {w}?", "Which letter does {w} end with?", "Give the final letter of {w}.", "{w} ends with which letter?"],
    "length": ["How many letters does {w} have?", "Count the letters in {w}.", "What is the length of the word {w}?", "{w} has how many letters?"],
}
IMAGE_TASKS = ("colour", "shape", "count", "position", "exists", "caption")
# last_letter and length ask what the LM read in prose ("The last letter of cat is t.", "The word cat has
# three letters."), as first_letter does: tasks of one family, so holding one out tests zero-shot transfer.
TEXT_TASKS = ("add", "reverse", "upper", "first_letter", "last_letter", "length")


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
    # Word length over every word the LM read facts about: the demo's own words are nearly all
    # four letters long (an answer prior of 90%).
    w = rng.choice(FACT_WORDS) if task == "length" else rng.choice(WORDS)
    if task == "reverse":
        return {"w": w}, w[::-1]
    if task == "upper":
        return {"w": w}, w.upper()
    if task == "first_letter":
        return {"w": w}, w[0]
    if task == "last_letter":
        return {"w": w}, w[-1]
    if task == "length":
        return {"w": w}, str(len(w))
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
    system: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Record]:
    """Draw `per_task` records for each task; images go to `out_dir/images/`.

    `phrasings` restricts which phrasing indices are used (None = all);
    `system`, when given, opens every record with that system turn.
    Deterministic for a seed. Image paths are absolute: a relative one would
    mean one file in memory (relative to the current directory) and another
    once the records are written to a JSONL file (relative to that file).
    """
    out = Path(out_dir).resolve()
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
                messages=[*([{"role": "system", "content": system}] if system else []),
                          {"role": "user", "content": content}, {"role": "assistant", "content": answer}],
                images=images, source="mmtune-synthetic", task=task, answers=[answer] * 10,
                meta={"phrasing": p, "cluster": cluster},
            ))
            if progress is not None:
                progress(1)
    return records


# --------------------------------------------------------------------------- #
# Pretraining data for the demo's bases (scripts/pretrain_demo_bases.py)
# --------------------------------------------------------------------------- #
# The bases must know what users' bases know before instruction tuning: a vision
# tower that tells colours, shapes, counts and places apart, and an LM that has
# read plain statements of the facts the tasks ask about. Both are drawn here
# with their own seeds; neither uses the instruction phrasings above.

NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                "fifteen sixteen seventeen eighteen").split()
# Words the LM reads facts about: the demo's words plus others, so letter facts are not a 30-item lookup.
EXTRA_WORDS = (
    "apple bread chair cloud drum egg flag goat hat ink jar key leg map net owl pen queen ring sock "
    "tent van web box yak zoo arm bus cup fan gate hill ice jam kid lid mud nut oak pig rug sea toy urn "
    "vase wig yarn bag bed car hen pot"
).split()
FACT_WORDS = WORDS + EXTRA_WORDS  # every word the LM's corpus states facts about


@dataclass(frozen=True)
class FreeThing:
    """A shape anywhere in the picture (pretraining scenes are not on the demo's grid)."""

    shape: str
    colour: str
    x: float  # centre, as a fraction of the width
    y: float
    r: float  # radius, as a fraction of the width


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in rgb)  # type: ignore[return-value]


def draw_free_scene(things: list[FreeThing], rng: random.Random, size: int = 64) -> Image.Image:
    """Shapes of any size anywhere, colours jittered, on a random light background."""
    bg = tuple(rng.randint(215, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(img)
    for t in things:
        cx, cy, r = t.x * size, t.y * size, t.r * size
        fill = _jitter(COLOURS[t.colour], rng)
        if t.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif t.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def free_scene(rng: random.Random, max_things: int = 4) -> list[FreeThing]:
    """1..max_things non-overlapping shapes; colours repeat and shapes repeat (counts vary)."""
    n = rng.randint(1, max_things)
    things: list[FreeThing] = []
    tries = 0
    while len(things) < n and tries < 200:
        tries += 1
        r = rng.uniform(0.07, 0.15)
        x, y = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
        if all((x - t.x) ** 2 + (y - t.y) ** 2 > (r + t.r + 0.02) ** 2 for t in things):
            things.append(FreeThing(rng.choice(SHAPES), rng.choice(list(COLOURS)), x, y, r))
    return things


def describe_scene(things: list[FreeThing] | list[Thing]) -> str:
    """One plain description, left to right: 'two shapes: a red circle left of a blue square'."""
    def key(t: FreeThing | Thing) -> float:
        return t.x if isinstance(t, FreeThing) else float(t.cell)

    ordered = sorted(things, key=key)
    items = [f"a {t.colour} {t.shape}" for t in ordered]
    head = f"{NUMBER_WORDS[len(items)]} shape{'s' if len(items) > 1 else ''}: "
    if len(items) == 2:
        return head + f"{items[0]} left of {items[1]}"
    return head + ", then ".join(items)


def _scene_facts(things: list[Thing], rng: random.Random) -> list[str]:
    """Three to seven declarative sentences about one grid scene, each true of it (what the LM reads about
    pictures, after their description)."""
    out: list[str] = []
    for t in things:
        out += [f"The {t.shape} is {t.colour}.", f"The {t.colour} shape is a {t.shape}.",
                f"There is a {t.colour} {t.shape} in the picture."]
    for s in SHAPES:
        n = sum(t.shape == s for t in things)
        out.append(f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {s}{'' if n == 1 else 's'}.")
        out.append(f"The number of {s}s is {n}.")
    for a in things:
        for b in things:
            if a.cell < b.cell:
                out += [f"The {a.colour} {a.shape} is on the left of the {b.colour} {b.shape}.",
                        f"The {b.colour} {b.shape} is on the right of the {a.colour} {a.shape}."]
    present = {(t.shape, t.colour) for t in things}
    s, c = rng.choice([(s, c) for s in SHAPES for c in COLOURS if (s, c) not in present])
    out.append(f"There is no {c} {s} in the picture.")
    rng.shuffle(out)
    return out[: rng.randint(3, 7)]


def _word_facts(w: str) -> list[str]:
    n = NUMBER_WORDS[len(w)] if len(w) < len(NUMBER_WORDS) else str(len(w))
    return [
        f"The word {w} starts with the letter {w[0]}.", f"The first letter of {w} is {w[0]}.",
        f"{w} begins with {w[0]}.", f"{w} spelled backwards is {w[::-1]}.", f"Backwards, {w} reads {w[::-1]}.",
        f"{w} in capital letters is {w.upper()}.", f"In upper case, {w} is written {w.upper()}.",
        f"The word {w} has {n} letters.", f"The last letter of {w} is {w[-1]}.",
    ]


def _sum_facts(a: int, b: int) -> list[str]:
    c = a + b
    A, B, C = NUMBER_WORDS[a].capitalize(), NUMBER_WORDS[b], NUMBER_WORDS[c]
    return [f"{A} plus {B} is {C}.", f"{a} plus {b} is {c}.", f"{a}+{b}={c}.", f"{a} + {b} = {c}.",
            f"The sum of {a} and {b} is {c}.", f"Adding {a} and {b} gives {c}."]


def fact_corpus(n_docs: int, seed: int) -> list[str]:
    """`n_docs` short paragraphs of plain declarative prose (no questions, no instructions, no chat markup).

    Each paragraph keeps to one topic, as real text does: three to six facts about
    one word (first letter, reversal, capitals, length, ...), sums of two digits,
    or one grid scene like the demo's, opening with the picture's description and
    going on with facts that follow from it. The topic is what teaches an LM to read
    its context: a sentence about the paragraph's word is only predictable by
    looking back at the word, a fact about the picture only by reading its
    description. (A corpus with a random word per sentence rewarded no looking
    back; the LM pretrained on it wrote about the words it liked best whatever its
    context said: scripts/probe_demo_lm.py's copy probe, README "The demo".)
    """
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        kind = rng.random()
        if kind < 0.4:
            facts = _word_facts(rng.choice(FACT_WORDS))
            rng.shuffle(facts)
            sents = facts[: rng.randint(3, 6)]
        elif kind < 0.65:
            sents = [rng.choice(_sum_facts(rng.randint(0, 9), rng.randint(0, 9))) for _ in range(rng.randint(3, 6))]
        else:
            things = _scene(rng, rng.randint(1, 3))
            sents = [f"The picture shows {_caption(things)}.", *_scene_facts(things, rng)]
        docs.append(" ".join(sents))
    return docs
