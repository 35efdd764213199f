"""Weighted mixtures of training sources: `data.train: [{path: a.jsonl, weight: 0.7}, {path: b/, weight: 0.3}]`.

`MixtureStream` holds one endless `ExampleStream` per source and draws, for
each example, which source gives it: source i with probability
weight_i / sum(weights). Each source streams on its own (its own shuffle,
its own epoch count: a small source is repeated more often than a large one
within the same run), so the proportions hold however large the sources are.

Determinism and resume (our own scheme): the draw for the k-th example of a
rank depends only on (seed, rank, k), through a generator seeded with those
values, so the choice sequence needs no saved RNG state. `state_dict()` is k,
each source stream's own state and the per-source counts; loading it and
iterating continues with exactly the examples (and so batches and losses) an
uninterrupted run would have had next.

`source_counts` (examples given per source so far) is what `mmtune train`
logs in metrics.jsonl as `sources`, and `epochs` each source's epoch.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from mmtune.data.stream import Example, ExampleStream
from mmtune.errors import MMTuneError

STATE_FORMAT = "mmtune.MixtureStream/1"


class MixtureStream:
    """Examples drawn from several `ExampleStream`s in proportion to their weights, resumably.

    Args:
        streams: one stream per source, each endless (`epochs=None`).
        weights: one positive weight per stream (normalised here).
        names: how each source is named in counts and errors (default "source0", ...).
        seed, rank: the draw sequence's seed (each rank draws its own sequence).
    """

    def __init__(self, streams: Sequence[ExampleStream], weights: Sequence[float], *,
                 names: Sequence[str] | None = None, seed: int = 0, rank: int = 0) -> None:
        if not streams or len(streams) != len(weights):
            raise MMTuneError(f"a mixture needs one weight per source ({len(streams)} sources, {len(weights)} weights)")
        for i, w in enumerate(weights):
            if not (isinstance(w, int | float) and w > 0):
                raise MMTuneError(f"data.train[{i}].weight must be > 0, got {w!r}")
        for s in streams:
            if s.epochs is not None:
                raise MMTuneError("every source of a mixture streams endlessly (epochs=None); the run decides the length")
        self.streams = list(streams)
        self.names = list(names) if names is not None else [f"source{i}" for i in range(len(streams))]
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        self._cum = list(itertools.accumulate(self.weights))
        self.seed, self.rank = seed, rank
        self.position = 0
        self.counts = [0] * len(self.streams)
        first = self.streams[0]
        self.tokenizer, self.max_length = first.tokenizer, first.max_length

    # ----------------------------------------------------------------- views
    @property
    def source_counts(self) -> dict[str, int]:
        return dict(zip(self.names, self.counts, strict=True))

    @property
    def epochs(self) -> dict[str, int]:
        return {n: s.epoch for n, s in zip(self.names, self.streams, strict=True)}

    @property
    def skip_counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self.streams:
            for kind, n in s.skip_counts.items():
                total[kind] = total.get(kind, 0) + n
        return total

    def choose(self, k: int) -> int:
        """The source of this rank's k-th example (a function of seed, rank and k only)."""
        u = random.Random(f"mmtune-mixture:{self.seed}:{self.rank}:{k}").random()
        return min(bisect.bisect_right(self._cum, u), len(self.streams) - 1)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "position": self.position, "counts": list(self.counts),
                "weights": list(self.weights), "names": list(self.names), "seed": self.seed, "rank": self.rank,
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise MMTuneError("cannot resume the data stream: the checkpoint was not written for a weighted mixture "
                              "(data.train changed?)")
        for key in ("weights", "names", "seed", "rank"):
            now, was = getattr(self, key), state.get(key)
            same = _close(now, was) if key == "weights" else was == now
            if not same:
                raise MMTuneError(f"cannot resume the mixture: {key} was {was!r} when saved, now {now!r}")
        for s, sub in zip(self.streams, state["streams"], strict=True):
            s.load_state_dict(sub)
        self.position = int(state["position"])
        self.counts = [int(c) for c in state["counts"]]

    # ------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Example]:
        iters: list[Iterator[Example] | None] = [None] * len(self.streams)
        while True:
            i = self.choose(self.position)
            if iters[i] is None:
                iters[i] = iter(self.streams[i])
            example = next(iters[i])  # type: ignore[arg-type]  # endless: never StopIteration
            self.position += 1
            self.counts[i] += 1
            yield example


def _close(now: list[float], was: Any) -> bool:
    """Weights equal up to float rounding (they go through JSON in the checkpoint)."""
    return isinstance(was, list) and len(was) == len(now) and all(
        isinstance(b, int | float) and abs(a - b) < 1e-12 for a, b in zip(now, was, strict=True))


def mixture_from_config(sources: Sequence[tuple[str, float]], make_stream: Callable[[str], ExampleStream], *,
                        seed: int, rank: int) -> MixtureStream:
    """A mixture of (path, weight) sources, each stream made by `make_stream(path)` (endless)."""
    streams = [make_stream(path) for path, _ in sources]
    return MixtureStream(streams, [w for _, w in sources], names=[p for p, _ in sources], seed=seed, rank=rank)
