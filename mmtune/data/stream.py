"""Records -> tokenized training examples with their image tensors, as a resumable stream.

`ExampleStream` reads unified-record JSONL files and/or webdataset shards
(`mmtune shard` output), tokenizes each record with `tokenize_record`, decodes
and transforms its images, and yields `(TokenizedExample, [Tensor[3,H,W], ...])`.

Order. Each epoch has one deterministic item sequence per rank, a function of
(sources, seed, epoch, shuffle settings, rank, world_size) only:
  1. shards are ordered per (seed, epoch) identically on every rank and split
     across ranks (`shards[rank::world_size]`, as `wds.split_by_node` does;
     every rank reads all shards and keeps every world_size-th sample when
     there are fewer shards than ranks); JSONL records are split by line
     (`i % world_size == rank`) and permuted per (seed, epoch);
  2. the rank's JSONL files and shards are visited in a seeded order;
  3. everything passes one seeded `wds.shuffle` buffer of `shuffle_buffer`.
DataLoader workers (`num_workers > 0`) do not change that sequence: it is cut
into blocks of `WORKER_BLOCK` consecutive items, worker w of n processes
blocks w, w+n, w+2n, ... and sends each as one message, the DataLoader's
in-order round robin puts the blocks back in sequence order, and skipped
records come back as markers, so the stream is identical for any number of
workers.

Skips are never silent: every record that cannot be used is counted in
`skip_counts[kind]` and logged with its id (the first few of each kind as
warnings, the rest at INFO). Kinds: `invalid_record`, `holdout_task`,
`images_in_llm_mode`, `image_error`, `shard_corrupt` (incomplete sample),
`shard_lost` (samples a truncated shard never gave, from its index),
`shard_error` (a shard broke and has no index to count by), and
`tokenize_record`'s own `no_trainable_tokens`, `images_exceed_max_length`,
`image_token_mismatch`.

Resuming. `state_dict()` is (epoch, position in the epoch's item sequence,
skip counts). `load_state_dict()` then `iter()` rebuilds that epoch's
sequence and drops the first `position` items without tokenizing them or
decoding their images (JSONL items are only file offsets until then; items of
local .tar shards only tar headers, `read_shard(lazy=True)`), so the next
example is exactly the one an uninterrupted run would have produced.

Reading. Items of local uncompressed .tar shards are tar headers (where each
member's bytes are) until `_process` reads them, so a DataLoader worker reads
the bytes of the samples it owns only, and the shuffle buffer holds no image
bytes (remote / compressed shards are read whole, by webdataset).
"""

from __future__ import annotations

import logging
import os
import random
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmtune.config import DataConfig
from mmtune.data.encode import SkipRecord, TokenizedExample, tokenize_record
from mmtune.data.images import ImageError, load_image, resolve_image_path
from mmtune.data.schema import Record, RecordError, validate_record
from mmtune.data.shards import (
    LazyShardSample,
    ShardLoss,
    ShardSample,
    assign_shards,
    epoch_shard_order,
    expand_shards,
    is_shard_source,
    read_assigned,
    reader_info,
)
from mmtune.data.templates import Template, get_template
from mmtune.data.textio import decode, parse_json
from mmtune.errors import MMTuneError

log = logging.getLogger(__name__)

STATE_FORMAT = "mmtune.ExampleStream/1"
WARN_PER_KIND = 10  # skipped ids logged as warnings per kind; the rest at INFO
OPEN_SHARDS = 8  # shard files a process keeps open for reading sample bytes
# Consecutive items a DataLoader worker processes and sends as one message: the
# DataLoader's per-message work (index and result queues, pickling, waking the
# main process) is paid once per block instead of once per example.
WORKER_BLOCK = 4

Example = tuple[TokenizedExample, list[torch.Tensor]]


class EmptyShareError(MMTuneError):
    """This process's share of the sources holds no record (fewer records than processes)."""


@dataclass(frozen=True)
class _JsonlItem:
    """A JSONL record not read yet: replaying a stream position never parses it."""

    path: str
    offset: int
    line: int


class _LineIndex:
    """Byte offset and 1-based line number of every non-blank line of a JSONL file."""

    def __init__(self, path: str) -> None:
        self.offsets, self.lines = array("q"), array("q")
        pos = 0
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if raw.strip():
                    self.offsets.append(pos)
                    self.lines.append(lineno)
                pos += len(raw)

    def __len__(self) -> int:
        return len(self.offsets)


class _JsonlUnit:
    """Some lines of one JSONL file, in a given order, as items made on demand."""

    def __init__(self, path: str, index: _LineIndex, order: list[int]) -> None:
        self.path, self.index, self.order = path, index, order

    def __iter__(self) -> Iterator[_JsonlItem]:
        for k in self.order:
            yield _JsonlItem(self.path, self.index.offsets[k], self.index.lines[k])


@dataclass(frozen=True)
class _Event:
    """Samples lost inside the item sequence (a truncated shard): counted where it happens."""

    kind: str
    count: int
    detail: str


@dataclass(frozen=True)
class _Skip:
    kind: str
    count: int
    record_id: str | None
    detail: str


class ExampleStream:
    """Tokenized examples (and image tensors) from JSONL files and/or webdataset shards.

    Args:
        sources: JSONL paths and/or shard sources (a `.tar`, a brace pattern,
            a shard folder, `pipe:` / `http(s)://` URLs); see `is_shard_source`.
        tokenizer, template: as for `tokenize_record` (template may be a name).
        max_length, num_image_tokens: as for `tokenize_record` (0 = llm mode).
        image_transform: PIL image -> Tensor[3, H, W]; required when
            num_image_tokens > 0.
        image_root: folder relative image paths in JSONL records start from.
        shuffle, shuffle_buffer, seed: ordering (see the module docstring).
        epochs: passes over the data; None streams forever.
        holdout_tasks: records whose `task` is listed are skipped (and counted).
        rank, world_size: this process's share; default from torch.distributed
            or the RANK / WORLD_SIZE environment.
        num_workers: DataLoader worker processes for tokenizing and decoding.

    One iterator at a time: iterating continues from the current state.
    """

    def __init__(
        self,
        sources: str | Sequence[str],
        tokenizer: Any,
        template: Template | str,
        *,
        max_length: int = 512,
        num_image_tokens: int = 0,
        image_transform: Callable[[Image.Image], torch.Tensor] | None = None,
        image_root: str | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        epochs: int | None = 1,
        holdout_tasks: Sequence[str] = (),
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        prefetch_factor: int | None = None,
        draft_size: int | None = None,
    ) -> None:
        self.sources = [os.fspath(sources)] if isinstance(sources, str | os.PathLike) else [os.fspath(s) for s in sources]
        if not self.sources:
            raise MMTuneError("data.train: no source given (JSONL files or shard patterns)")
        self.tokenizer = tokenizer
        self.template = get_template(template, tokenizer) if isinstance(template, str) else template
        self.max_length = max_length
        self.num_image_tokens = num_image_tokens
        if num_image_tokens > 0 and image_transform is None:
            raise MMTuneError("num_image_tokens > 0 (mllm mode) needs an image_transform")
        self.image_transform = image_transform
        self.image_root = image_root
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        if epochs is not None and epochs < 1:
            raise MMTuneError(f"epochs must be >= 1 or None (endless), got {epochs}")
        self.epochs = epochs
        self.holdout_tasks = frozenset(holdout_tasks)
        self.rank, self.world_size, _, _ = reader_info(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise MMTuneError(f"rank {self.rank} out of range for world_size {self.world_size}")
        if num_workers < 0:
            raise MMTuneError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor  # DataLoader's (items queued per worker); None: torch's default
        self.draft_size = draft_size  # JPEG draft decoding (see mmtune.data.images.load_image)

        self._jsonl: list[str] = []
        self._shards: list[str] = []
        for src in self.sources:
            if is_shard_source(src):
                self._shards.extend(expand_shards(src))
            elif os.path.isfile(src):
                self._jsonl.append(src)
            else:
                raise MMTuneError(f"{src}: not found (expected a records .jsonl file or a shard pattern)")
        self._index = {path: _LineIndex(path) for path in self._jsonl}
        mine = sum(len(range(self.rank, len(ix), self.world_size)) for ix in self._index.values())
        if not mine and not self._shards:
            raise EmptyShareError(f"rank {self.rank} of {self.world_size} gets no record from {', '.join(self.sources)}")
        self._handles: dict[tuple[int, str], Any] = {}
        self._shard_fds: dict[tuple[int, str], int] = {}  # most recently used last

        # Progress: everything a resumed run needs (see state_dict).
        self.skip_counts: dict[str, int] = {}
        self.examples_yielded = 0
        self._epoch = 0
        self._position = 0
        self._epoch_examples = 0
        self._epoch_from_start = True
        self._skips_logged: dict[str, int] = {}

    @classmethod
    def from_config(
        cls,
        cfg: DataConfig,
        tokenizer: Any,
        *,
        num_image_tokens: int = 0,
        image_transform: Callable[[Image.Image], torch.Tensor] | None = None,
        seed: int = 0,
        epochs: int | None = 1,
        rank: int | None = None,
        world_size: int | None = None,
        sources: Sequence[str] | None = None,
        draft_size: int | None = None,
    ) -> ExampleStream:
        """The stream a run's `data:` section describes (train sources, template, lengths, holdouts, workers).

        `sources`: read these instead of `cfg.train` (one source of a weighted mixture, or data.eval);
        `draft_size`: JPEG draft decoding size (data.jpeg_draft; the tower's input size).
        """
        return cls(
            list(sources) if sources is not None else cfg.train_paths(), tokenizer, cfg.template,
            max_length=cfg.max_length, num_image_tokens=num_image_tokens,
            image_transform=image_transform, image_root=cfg.image_root, shuffle_buffer=cfg.shuffle_buffer,
            seed=seed, epochs=epochs, holdout_tasks=cfg.holdout_tasks, rank=rank, world_size=world_size,
            num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor, draft_size=draft_size,
        )

    def __getstate__(self) -> dict[str, Any]:  # open files stay with the process that opened them
        return {**self.__dict__, "_handles": {}, "_shard_fds": {}}

    # ----------------------------------------------------------------- state
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def skipped(self) -> int:
        return sum(self.skip_counts.values())

    def _order_key(self) -> dict[str, Any]:
        return {"sources": list(self.sources), "seed": self.seed, "shuffle": self.shuffle,
                "shuffle_buffer": self.shuffle_buffer, "rank": self.rank, "world_size": self.world_size}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: where the next example comes from, and the skip counts so far."""
        return {"format": STATE_FORMAT, "epoch": self._epoch, "position": self._position,
                "examples": self.examples_yielded, "skip_counts": dict(self.skip_counts), **self._order_key()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the settings that decide the order must be the ones it was saved with."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise MMTuneError(f"not an ExampleStream state (format {state.get('format') if isinstance(state, dict) else state!r})")
        for key, now in self._order_key().items():
            if state.get(key) != now:
                raise MMTuneError(f"cannot resume the data stream: {key} was {state.get(key)!r} when saved, now {now!r}")
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self.examples_yielded = int(state.get("examples", 0))
        self.skip_counts = {str(k): int(v) for k, v in state.get("skip_counts", {}).items()}
        self._epoch_examples = 0
        self._epoch_from_start = self._position == 0

    # ------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Example]:
        start = (self._epoch, self._position)
        outcomes = self._loader(start) if self.num_workers > 0 else self._outcomes(0, 1, start)
        for epoch, position, outcome in outcomes:
            if epoch != self._epoch:
                self._end_epoch()
                self._epoch, self._epoch_examples, self._epoch_from_start = epoch, 0, True
            self._position = position
            if isinstance(outcome, _Skip):
                self._count_skip(outcome)
                continue
            self._epoch_examples += 1
            self.examples_yielded += 1
            yield outcome
        self._end_epoch()
        if self.epochs is not None:  # finished: a new iter() yields nothing instead of replaying
            self._epoch, self._position, self._epoch_from_start = self.epochs, 0, True

    def _end_epoch(self) -> None:
        if self._epoch_from_start and self._epoch_examples == 0 and (self.epochs is None or self._epoch < self.epochs):
            raise MMTuneError(
                f"epoch {self._epoch} gave no usable example on rank {self.rank} "
                f"(skipped: {self.skip_counts or 'nothing; the sources are empty'})"
            )

    def _count_skip(self, skip: _Skip) -> None:
        self.skip_counts[skip.kind] = self.skip_counts.get(skip.kind, 0) + skip.count
        n = self._skips_logged.get(skip.kind, 0)
        self._skips_logged[skip.kind] = n + 1
        level = logging.WARNING if n < WARN_PER_KIND else logging.INFO
        who = f"record {skip.record_id!r}" if skip.record_id is not None else f"{skip.count} sample(s)"
        log.log(level, "skipped %s [%s]: %s", who, skip.kind, skip.detail)
        if n + 1 == WARN_PER_KIND:
            log.warning("further %s skips are logged at INFO level (counts stay in skip_counts)", skip.kind)

    def _loader(self, start: tuple[int, int]) -> Iterator[tuple[int, int, Example | _Skip]]:
        extra = {"prefetch_factor": self.prefetch_factor} if self.prefetch_factor else {}
        loader = DataLoader(_WorkerItems(self, start), batch_size=None, num_workers=self.num_workers,
                            collate_fn=_identity, in_order=True, **extra)
        for block in loader:  # the blocks in sequence order (in_order round robin over the workers)
            for epoch, position, outcome in block:
                if not isinstance(outcome, _Skip):
                    example, images = outcome
                    outcome = example, [_Pixels.unwrap(t) for t in images]
                yield epoch, position, outcome

    def _outcomes(self, worker: int, num_workers: int, start: tuple[int, int],
                  block: int = 1) -> Iterator[tuple[int, int, Example | _Skip]]:
        """(epoch, position after the item, example or skip) for this worker's share of the sequence:
        blocks of `block` consecutive items, worker w taking blocks w, w + num_workers, ..."""
        for g, (epoch, position, item) in enumerate(self._sequence(*start)):
            if (g // block) % num_workers == worker:
                yield epoch, position, self._process(item)

    def _sequence(self, start_epoch: int, start_position: int) -> Iterator[tuple[int, int, Any]]:
        epoch = start_epoch
        while self.epochs is None or epoch < self.epochs:
            n = 0
            for n, item in enumerate(self._epoch_items(epoch), start=1):
                if epoch == start_epoch and n <= start_position:
                    continue  # replay: already consumed before the state was saved
                yield epoch, n, item
            if n == 0 and self.epochs is None:
                raise MMTuneError(f"rank {self.rank}: the sources gave no sample in epoch {epoch}; cannot stream forever")
            if epoch == start_epoch and n < start_position:
                log.warning("resumed at item %d of epoch %d, which now has only %d: the data changed since the "
                            "state was saved", start_position, epoch, n)
            epoch += 1

    def _epoch_items(self, epoch: int) -> Iterator[Any]:
        """This rank's items for one epoch, in their final (shuffled) order."""
        units: list[Any] = []
        for i, path in enumerate(self._jsonl):
            order = list(range(self.rank, len(self._index[path]), self.world_size))
            if self.shuffle:
                random.Random(f"mmtune-jsonl:{self.seed}:{epoch}:{i}:{self.rank}").shuffle(order)
            units.append(_JsonlUnit(path, self._index[path], order))
        order = epoch_shard_order(self._shards, self.seed, epoch, self.shuffle)
        mine, split_samples = assign_shards(order, self.rank, self.world_size)
        if split_samples:  # one unit: all ranks must walk the shards in the same order
            units.append(_ShardUnit(mine, True, self.rank, self.world_size))
        else:
            units.extend(_ShardUnit([url], False, self.rank, self.world_size) for url in mine)
        if self.shuffle:
            random.Random(f"mmtune-units:{self.seed}:{epoch}:{self.rank}").shuffle(units)
        items = (item for unit in units for item in unit)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(f"mmtune-buffer:{self.seed}:{epoch}:{self.rank}")
            return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(items)
        return items

    # ------------------------------------------------------------ processing
    def _read_jsonl(self, item: _JsonlItem) -> Record:
        key = (os.getpid(), item.path)  # forked workers must not share a file position
        fh = self._handles.get(key)
        if fh is None:
            fh = self._handles[key] = open(item.path, "rb")  # noqa: SIM115 (kept open for the stream's life)
        fh.seek(item.offset)
        obj, reason = parse_json(decode(fh.readline(), first=item.offset == 0).rstrip("\r\n"))
        if reason is not None:
            raise RecordError(reason, path=item.path, line=item.line)
        return validate_record(obj, line=item.line, path=item.path)

    def _read_span(self, url: str, offset: int, size: int) -> bytes:
        """A sample member's bytes from a local shard (`LazyShardSample.load`), through a few kept-open files."""
        key = (os.getpid(), url)  # forked workers open their own
        fd = self._shard_fds.pop(key, None)
        if fd is None:
            fd = os.open(url, os.O_RDONLY)
            while len(self._shard_fds) >= OPEN_SHARDS:
                os.close(self._shard_fds.pop(next(iter(self._shard_fds))))
        self._shard_fds[key] = fd
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{len(data)} of {size} bytes at offset {offset} (the shard changed since it was scanned)")
        return data

    def _process(self, item: Any) -> Example | _Skip:
        if isinstance(item, _Event):
            return _Skip(item.kind, item.count, None, item.detail)
        if isinstance(item, LazyShardSample):  # only now, in the process that owns it, are its bytes read
            try:
                item = item.load(self._read_span)
            except OSError as exc:
                return _Skip("shard_corrupt", 1, None, f"{item.url}, sample {item.key!r}: {exc}")
        try:
            record = item.record() if isinstance(item, ShardSample) else self._read_jsonl(item)
        except RecordError as exc:
            corrupt = isinstance(item, ShardSample) and item.error is not None
            return _Skip("shard_corrupt" if corrupt else "invalid_record", 1, exc.record_id, exc.describe())
        if record.task is not None and record.task in self.holdout_tasks:
            return _Skip("holdout_task", 1, record.id, f"task {record.task!r} is held out")
        if record.images and self.num_image_tokens <= 0:
            return _Skip("images_in_llm_mode", 1, record.id, f"{len(record.images)} image(s) but the model takes none")
        try:
            example = tokenize_record(record, self.tokenizer, self.template,
                                      max_length=self.max_length, num_image_tokens=self.num_image_tokens)
        except SkipRecord as skip:
            return _Skip(skip.kind, 1, record.id, str(skip))
        images: list[torch.Tensor] = []
        sources: list[Any] = (item.image_bytes if isinstance(item, ShardSample)
                              else [resolve_image_path(p, self.image_root) for p in record.images])
        for i, src in enumerate(sources):
            try:
                tensor = self.image_transform(load_image(src, draft_size=self.draft_size))  # type: ignore[misc]
            except (ImageError, OSError, ValueError) as exc:
                where = f"{item.url}, sample {item.key!r}" if isinstance(item, ShardSample) else record.images[i]
                return _Skip("image_error", 1, record.id, f"images[{i}] ({where}): {exc}")
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3 or tensor.shape[0] != 3:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise MMTuneError(f"image_transform must return a [3, H, W] tensor, got {shape}")
            images.append(tensor)
        return example, images


class _ShardUnit:
    """Shards read in turn for one rank; reading them is what the iteration does."""

    def __init__(self, urls: list[str], split_samples: bool, rank: int, world_size: int) -> None:
        self.urls, self.split, self.rank, self.world_size = urls, split_samples, rank, world_size

    def __iter__(self) -> Iterator[ShardSample | LazyShardSample | _Event]:
        # lazy: items are tar headers until processed, so a DataLoader worker reads (and the shuffle
        # buffer holds) the bytes of its own samples only; the item sequence is the eager reader's.
        for item in read_assigned(self.urls, self.rank, self.world_size, self.split, lazy=True):
            if not isinstance(item, ShardLoss):
                yield item
            elif item.mine is None:
                yield _Event("shard_error", 1, item.describe())
            elif item.mine:
                yield _Event("shard_lost", item.mine, item.describe())


class _WorkerItems(IterableDataset):
    """A stream's outcomes for the DataLoader worker iterating it (see ExampleStream)."""

    def __init__(self, stream: ExampleStream, start: tuple[int, int]) -> None:
        self.stream, self.start = stream, start

    def __iter__(self) -> Iterator[list[tuple[int, int, Any]]]:
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
        block: list[tuple[int, int, Any]] = []
        for epoch, position, outcome in self.stream._outcomes(worker, n, self.start, WORKER_BLOCK):
            if not isinstance(outcome, _Skip):
                example, images = outcome
                outcome = example, [_Pixels.wrap(t) for t in images]
            block.append((epoch, position, outcome))
            if len(block) == WORKER_BLOCK:
                yield block
                block = []
        if block:
            yield block


class _Pixels:
    """An image tensor on its way from a DataLoader worker to the main process, as a plain array.

    A torch tensor leaving a worker is moved to a new shared-memory segment and its
    file descriptor passed over a socket, per image; for images of a few hundred KB
    the segment's set-up and first-touch page faults cost more than sending the
    bytes through the worker's pipe, on both sides (measured on the development
    machine: ~1.2 ms worker + 0.8 ms main process per 336 px image through shared
    memory, ~0.3 + 0.4 ms as an array). The array is the tensor's memory in its
    own layout (a uint8 [3, H, W] view of HWC bytes travels as the HWC bytes), so
    nothing is transposed on the way; `unwrap` gives back an equal tensor of the
    same shape and dtype.
    """

    __slots__ = ("array", "order")

    def __init__(self, array: Any, order: tuple[int, ...]) -> None:
        self.array, self.order = array, order

    def __getstate__(self) -> tuple[Any, tuple[int, ...]]:
        return self.array, self.order

    def __setstate__(self, state: tuple[Any, tuple[int, ...]]) -> None:
        self.array, self.order = state

    @staticmethod
    def wrap(t: torch.Tensor) -> Any:
        if t.dtype not in (torch.uint8, torch.float32, torch.float16, torch.float64) or t.requires_grad:
            return t  # a dtype numpy lacks (bfloat16): torch's own transfer
        order = tuple(sorted(range(t.ndim), key=lambda d: (-t.stride(d), d)))  # memory order of the dims
        mem = t.permute(order)
        if not mem.is_contiguous():
            mem = mem.contiguous()
        return _Pixels(mem.numpy(), order)

    @staticmethod
    def unwrap(x: Any) -> torch.Tensor:
        if not isinstance(x, _Pixels):
            return x
        inverse = [0] * len(x.order)
        for i, d in enumerate(x.order):
            inverse[d] = i
        return torch.from_numpy(x.array).permute(inverse)


def _identity(x: Any) -> Any:
    return x
