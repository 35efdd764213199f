"""What does a demo base LM know before any tuning? Greedy continuations of the facts its corpus states.

    python scripts/probe_demo_lm.py [--bases DIR]     # default: the shipped mmtune/assets/demo_bases

For every word the demo's text tasks ask about (mmtune.data.synthetic.WORDS),
the LM continues six declarative prompts in the corpus's style ("The first
letter of moon is", "moon spelled backwards is", ...) and a fact counts as
known when the greedy continuation starts with the right answer. Prints the
hits per fact. This is what the held-out `first_letter` task and the text
tasks could draw on: a tuned model that answers "What is the first letter of
moon?" wrongly while its base completes "The first letter of moon is" with
"m" knows the fact and did not learn to use it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

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


def probe(lm_dir: Path, words: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """Per fact: (words whose greedy continuation starts with the answer, words asked)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    words = list(words or WORDS)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    out: dict[str, tuple[int, int]] = {}
    with torch.no_grad():
        for fact, (prompt, answer) in FACTS.items():
            hits = 0
            for w in words:
                ids = torch.tensor([tok(prompt.format(w=w))["input_ids"]])  # 1 x T
                gen = lm.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
                hits += tok.decode(gen[0, ids.shape[1]:]).strip().startswith(answer(w))
            out[fact] = (hits, len(words))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bases", type=Path, default=DEMO_BASES,
                    help="a folder with lm/ (default: the shipped bases)")
    args = ap.parse_args(argv)
    lm_dir = args.bases / "lm"
    if not (lm_dir / "config.json").is_file():
        print(f"error: {lm_dir} is not a Hugging Face model folder (no config.json)", file=sys.stderr)
        return 2
    print(f"{lm_dir}: greedy continuations, words known per fact")
    for fact, (hits, n) in probe(lm_dir).items():
        print(f"  {fact:<13} {hits:>3} / {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
