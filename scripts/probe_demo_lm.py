"""What does a demo base LM know before any tuning? Greedy continuations of the facts its corpus states.

    python scripts/probe_demo_lm.py [--bases DIR]     # default: the shipped mmtune/assets/demo_bases

First, whether the LM reads its context at all: for `--copy` words it reads a
sentence about the word ("moon in capital letters is MOON.") and continues
"The first letter of": a base that looks back names the word again, one that
does not names the word it likes best whatever came before.

Then, for every word the demo's text tasks ask about (mmtune.data.synthetic.WORDS),
the LM continues six declarative prompts in the corpus's style ("The first
letter of moon is", "moon spelled backwards is", ...) and a fact counts as
known when the greedy continuation starts with the right answer. Prints the
hits per fact. This is what the held-out `first_letter` task and the text
tasks could draw on: a tuned model that answers "What is the first letter of
moon?" wrongly while its base completes "The first letter of moon is" with
"m" knows the fact and did not learn to use it.

Then the scene facts, read from a description in context: for `--scenes`
drawn scenes of the demo's vision tasks (a seed the pool, eval sets and
pretraining corpora do not use) the LM reads "The picture shows a red circle
and a blue square." and continues the corpus's sentences about that picture
("The blue square is on the", "The circle is", "The number of squares is",
"The red shape is a"). This is what the vision tasks ask, in the LM's own
prose with the picture already put into words: a fact the base cannot derive
here is one no projector can hand it.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from mmtune.data.synthetic import NUMBER_WORDS, WORDS
from mmtune.demo import DEMO_BASES

FACTS: dict[str, tuple[str, Callable[[str], str]]] = {
    "first letter": ("The first letter of {w} is", lambda w: w[0]),
    "starts with": ("The word {w} starts with the letter", lambda w: w[0]),
    "last letter": ("The last letter of {w} is", lambda w: w[-1]),
    "backwards": ("{w} spelled backwards is", lambda w: w[::-1]),
    "capitals": ("{w} in capital letters is", lambda w: w.upper()),
    "length": ("The word {w} has", lambda w: NUMBER_WORDS[len(w)]),
}


@functools.lru_cache(maxsize=2)  # main runs three probes on one folder: load it once
def _load(lm_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(lm_dir), AutoModelForCausalLM.from_pretrained(lm_dir).eval()


def greedy(lm_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """The LM's greedy continuation of `prompt`, stripped."""
    tok, lm = _load(lm_dir)
    ids = torch.tensor([tok(prompt)["input_ids"]])  # 1 x T
    with torch.no_grad():
        gen = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(gen[0, ids.shape[1]:]).strip()


def probe(lm_dir: Path, words: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """Per fact: (words whose greedy continuation starts with the answer, words asked)."""
    words = list(words or WORDS)
    return {fact: (sum(greedy(lm_dir, prompt.format(w=w), 4).startswith(answer(w)) for w in words), len(words))
            for fact, (prompt, answer) in FACTS.items()}


COPY_SEED = 960_007  # as SCENE_SEED below: a seed nothing else draws with


def probe_copy(lm_dir: Path, n: int = 100, seed: int = COPY_SEED) -> tuple[int, int, str, int]:
    """(continuations that name the word in context again, words asked, the most common first word, its count)."""
    import random

    from mmtune.data.synthetic import FACT_WORDS

    rng = random.Random(seed)
    words = [rng.choice(FACT_WORDS) for _ in range(n)]
    texts = [greedy(lm_dir, f"{w} in capital letters is {w.upper()}. The first letter of", 3) for w in words]
    hits = sum(text.split()[:1] == [w] for w, text in zip(words, texts))
    return (hits, n, *_most_common_first_word(texts))


def _most_common_first_word(texts: list[str]) -> tuple[str, int]:
    """The commonest first word of the continuations and its count: one word every time means the LM
    answers from what it likes best, not from its context."""
    from collections import Counter

    return Counter((text.split() or [""])[0].rstrip(".") for text in texts).most_common(1)[0]


SCENE_SEED = 960_006  # not the pool's, the eval sets', the other probes' or the pretraining corpora's


def scene_prompts(n: int, seed: int = SCENE_SEED) -> dict[str, list[tuple[str, str]]]:
    """Per vision task, `n` (prompt, answer) pairs: the scene's description, then a corpus sentence to finish."""
    import random

    from mmtune.data.synthetic import _caption, _image_example

    rng = random.Random(seed)
    out: dict[str, list[tuple[str, str]]] = {"position": [], "colour": [], "count": [], "shape": []}
    for _ in range(n):
        things, slots, answer = _image_example("position", rng)
        a = things[0]
        out["position"].append((f"The picture shows {_caption(things)}. The {a.colour} {a.shape} is on the", answer))
        things, slots, answer = _image_example("colour", rng)
        out["colour"].append((f"The picture shows {_caption(things)}. The {slots['shape']} is", answer))
        things, slots, answer = _image_example("count", rng)
        out["count"].append((f"The picture shows {_caption(things)}. The number of {slots['shape']}s is", answer))
        things, slots, answer = _image_example("shape", rng)
        out["shape"].append((f"The picture shows {_caption(things)}. The {slots['colour']} shape is a", answer))
    return out


def probe_scenes(lm_dir: Path, n: int = 100,
                 tasks: tuple[str, ...] | None = None) -> dict[str, tuple[int, int, str, int]]:
    """Per vision task (all, or `tasks`): (greedy continuations that start with the answer, prompts, the most
    common first word of the continuations, how many times it came). A base that reads the description
    varies its answer with it; one that recalls a sentence gives the same word whatever the scene."""
    out: dict[str, tuple[int, int, str, int]] = {}
    for task, pairs in scene_prompts(n).items():
        if tasks is not None and task not in tasks:
            continue
        texts = [greedy(lm_dir, prompt, 3) for prompt, _ in pairs]
        hits = sum(text.startswith(answer) for text, (_, answer) in zip(texts, pairs))
        out[task] = (hits, len(pairs), *_most_common_first_word(texts))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bases", type=Path, default=DEMO_BASES,
                    help="a folder with lm/ (default: the shipped bases)")
    ap.add_argument("--copy", type=int, default=100, help="words for the context-reading probe (0: skip)")
    ap.add_argument("--scenes", type=int, default=100, help="scenes per vision task for the scene facts (0: skip)")
    args = ap.parse_args(argv)
    lm_dir = args.bases / "lm"
    if not (lm_dir / "config.json").is_file():
        print(f"error: {lm_dir} is not a Hugging Face model folder (no config.json)", file=sys.stderr)
        return 2
    if args.copy:
        hits, n, top, count = probe_copy(lm_dir, args.copy)
        print(f"{lm_dir}: reads its context (names the word of the sentence before again): {hits} / {n}   "
              f"(most common word: {top!r}, {count} times)")
    print(f"{lm_dir}: greedy continuations, words known per fact")
    for fact, (hits, n) in probe(lm_dir).items():
        print(f"  {fact:<13} {hits:>3} / {n}")
    if args.scenes:
        print("scene facts from a description in context ('The picture shows ... .'), right continuations")
        for task, (hits, n, top, count) in probe_scenes(lm_dir, args.scenes).items():
            print(f"  {task:<13} {hits:>3} / {n}   (most common answer: {top!r}, {count} times)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
