"""Examples -> training batches: fixed size, length grouping, optional packing, resumable.

`Batcher` takes `(TokenizedExample, images)` pairs from an `ExampleStream`
(or any iterable of them) and fills a buffer:

* plain: the buffer is one batch of `batch_size` examples in stream order;
* `group_by_length`: a buffer of `batch_size * group_factor` examples is sorted
  by length and cut into batches, and the batches are shuffled with
  (seed, buffer number), so each batch holds similar lengths (little padding)
  while batch order stays random;
* `group_by_modality` (LLaVA-1.5's `group_by_modality_length`): batches hold
  only image records or only text-only records (each kind sorted by length
  when `group_by_length`); the leftovers of both kinds, fewer than a batch
  each, share the buffer's last batch(es), as LLaVA's last mixed megabatch;
* `packing`: the buffer's examples are packed first-fit-decreasing into rows of
  `pack_length` tokens; a batch is `batch_size` rows. Each packed example gets
  `position_ids` restarting at 0 and its first label set to -100 (it has no
  previous token of its own to be predicted from), so with
  `model_inputs(batch)` (which drops the 2D attention_mask when position_ids
  are present) transformers builds a block-diagonal causal mask from the
  position_ids (`find_packed_sequence_indices`; flash-attention reads them as
  cu_seqlens) and attention never crosses examples. The loss of a packed batch
  then equals the token-weighted loss of the same examples unpacked. Image
  runs are never split: an example is packed whole.

Batches are the contract's dict: `input_ids`, `attention_mask` (1 = real token,
also in packed batches, for token counts and padding share), `labels`,
`pixel_values` (images in reading order: row by row, left to right) when any,
`position_ids` when packed, and `ids` / `num_images` (per example, reading order).
Images arrive as the stream's transform made them (uint8 pixels from a tower
with a pixel_norm, which normalises them on the device) and are stacked as
they are (`collate.stack_images`: channels-last when they are HWC views). `pin_memory=True` (CUDA runs) returns the batch's tensors in
page-locked memory, so the trainer's `.to(device, non_blocking=True)` is an
asynchronous copy.

Resuming: the state is the stream's state at the start of the current buffer,
the buffer's number and how many of its batches were already yielded. On
resume the buffer is refilled from the stream (so its examples are tokenized
and decoded again: at most `batch_size * group_factor` of them), planned
identically, and the yielded batches are passed over.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from mmtune.config import DataConfig
from mmtune.data.collate import collate_examples, pad_sequences, stack_images
from mmtune.data.encode import IGNORE_INDEX, TokenizedExample
from mmtune.errors import MMTuneError

STATE_FORMAT = "mmtune.Batcher/1"
NON_TENSOR_KEYS = ("ids", "num_images")

Example = tuple[TokenizedExample, list[torch.Tensor]]
Plan = list[list[list[int]]]  # batches -> rows -> buffer indices


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch as a model call takes it: tensors only; for packed batches no 2D mask and no cache.

    transformers 5.x builds the block-diagonal mask of packed rows from
    `position_ids` (`masking_utils.find_packed_sequence_indices`) only when
    `attention_mask` is None and there is no KV cache, so a packed batch
    carries `use_cache=False`. Padding at a row's end is its own position
    run, i.e. a separate sequence nobody attends to (and its labels are -100).
    """
    out: dict[str, Any] = {k: v for k, v in batch.items() if k not in NON_TENSOR_KEYS and isinstance(v, torch.Tensor)}
    if "position_ids" in out:
        out.pop("attention_mask", None)
        out["use_cache"] = False
    return out


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of example lengths into rows of `capacity` tokens.

    Returns rows of indices into `lengths`, longest example first in each row.
    Hand-written because it is a dozen lines over the buffer (no library
    packs sequences for causal-LM training without taking over the loop).
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        if n > capacity:
            raise MMTuneError(f"example of {n} tokens does not fit pack_length={capacity}")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def collate_packed(
    rows: Sequence[Sequence[TokenizedExample]],
    pad_token_id: int,
    *,
    pixel_values: Sequence[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Rows of several examples each -> a right-padded packed batch with restarting position_ids."""
    ids_rows, label_rows, pos_rows = [], [], []
    for row in rows:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for ex in row:
            ids.extend(ex.input_ids)
            labels.append(IGNORE_INDEX)  # never a target: it would be predicted from the previous example
            labels.extend(ex.labels[1:])
            pos.extend(range(len(ex)))
        ids_rows.append(ids)
        label_rows.append(labels)
        pos_rows.append(pos)
    width = max(len(r) for r in ids_rows)
    batch = {
        "input_ids": pad_sequences(ids_rows, pad_token_id, length=width),
        "attention_mask": pad_sequences([[1] * len(r) for r in ids_rows], 0, length=width),
        "labels": pad_sequences(label_rows, IGNORE_INDEX, length=width),
        # the padding tail restarts at 0 too: a separate "sequence" nobody attends to
        "position_ids": pad_sequences([p + list(range(width - len(p))) for p in pos_rows], 0, length=width),
    }
    n_images = sum(len(ex.image_spans) for row in rows for ex in row)
    if len(pixel_values or ()) != n_images:
        raise ValueError(f"batch has {n_images} image runs but {len(pixel_values or ())} images")
    if n_images:
        batch["pixel_values"] = stack_images(pixel_values or ())
    return batch


def _require_packed_masks() -> None:
    """Packing is only correct where transformers builds per-example masks from position_ids."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        import transformers

        raise MMTuneError(
            f"packing needs a transformers version that masks packed sequences from position_ids "
            f"(transformers.masking_utils.find_packed_sequence_indices); {transformers.__version__} has none"
        ) from None


class Batcher:
    """Batches (dicts) from a stream of `(TokenizedExample, images)`; see the module docstring.

    `stream` should have `state_dict()` / `load_state_dict()` (an
    `ExampleStream`) for the batcher to be resumable; any iterable works otherwise.
    """

    def __init__(
        self,
        stream: Iterable[Example],
        *,
        batch_size: int,
        pad_token_id: int | None = None,
        group_by_length: bool = True,
        group_factor: int = 16,
        packing: bool = False,
        pack_length: int | None = None,
        seed: int = 0,
        drop_last: bool = False,
        group_by_modality: bool = False,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise MMTuneError(f"batch_size must be >= 1, got {batch_size}")
        if group_factor < 1:
            raise MMTuneError(f"group_factor must be >= 1, got {group_factor}")
        self.stream = stream
        self.batch_size = batch_size
        if pad_token_id is None:
            pad_token_id = getattr(getattr(stream, "tokenizer", None), "pad_token_id", None)
            if pad_token_id is None:
                raise MMTuneError("Batcher needs pad_token_id (the stream's tokenizer has no pad token)")
        self.pad_token_id = int(pad_token_id)
        self.group_by_length = group_by_length
        self.group_by_modality = group_by_modality
        if group_by_modality and packing:
            raise MMTuneError("group_by_modality and packing cannot be combined (a packed row mixes examples)")
        self.group_factor = group_factor
        self.packing = packing
        self.pack_length = pack_length or getattr(stream, "max_length", None)
        if packing and not self.pack_length:
            raise MMTuneError("packing needs pack_length (or a stream with max_length)")
        if packing:
            _require_packed_masks()
        stream_max = getattr(stream, "max_length", None)
        if packing and stream_max and self.pack_length < stream_max:
            raise MMTuneError(f"pack_length={self.pack_length} must be >= the stream's max_length={stream_max}")
        self.seed = seed
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.stats = {"batches": 0, "examples": 0, "tokens": 0, "slots": 0, "dropped_examples": 0}
        self._buffer_index = 0
        self._emitted = 0
        self._buffer_start: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, stream: Iterable[Example], cfg: DataConfig, *, batch_size: int, seed: int = 0,
                    pad_token_id: int | None = None, pin_memory: bool = False) -> Batcher:
        """Batching as a run's `data:` section asks (group_by_length x group_factor, group_by_modality,
        packing into max_length rows); `pin_memory` for a CUDA device."""
        return cls(stream, batch_size=batch_size, pad_token_id=pad_token_id, group_by_length=cfg.group_by_length,
                   group_factor=cfg.group_factor, packing=cfg.packing,
                   pack_length=cfg.max_length if cfg.packing else None, seed=seed,
                   group_by_modality=cfg.group_by_modality, pin_memory=pin_memory)

    @property
    def buffer_size(self) -> int:
        grouped = self.group_by_length or self.packing or self.group_by_modality
        return self.batch_size * (self.group_factor if grouped else 1)

    @property
    def padding_share(self) -> float:
        """Padding slots / all slots over every batch yielded so far (0 when none yet)."""
        return 1.0 - self.stats["tokens"] / self.stats["slots"] if self.stats["slots"] else 0.0

    @property
    def skip_counts(self) -> dict[str, int]:
        return dict(getattr(self.stream, "skip_counts", {}))

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: stream state at the current buffer's start, buffer number, batches yielded."""
        if not hasattr(self.stream, "state_dict"):
            raise MMTuneError("this Batcher's stream has no state_dict(); use an ExampleStream to resume")
        start = self._buffer_start if self._buffer_start is not None else self.stream.state_dict()
        return {"format": STATE_FORMAT, "stream": start, "buffer": self._buffer_index, "emitted": self._emitted,
                "stats": dict(self.stats), "settings": self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise MMTuneError("not a Batcher state")
        if state.get("settings") != self._settings():
            raise MMTuneError(f"cannot resume batching: settings were {state.get('settings')}, now {self._settings()}")
        self.stream.load_state_dict(state["stream"])  # type: ignore[attr-defined]
        self._buffer_start = state["stream"]
        self._buffer_index = int(state["buffer"])
        self._emitted = int(state["emitted"])
        self.stats = {k: int(v) for k, v in state["stats"].items()}

    def _settings(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "group_by_length": self.group_by_length,
                "group_factor": self.group_factor, "packing": self.packing,
                "pack_length": self.pack_length if self.packing else None, "seed": self.seed,
                "drop_last": self.drop_last, **({"group_by_modality": True} if self.group_by_modality else {})}

    # ------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        examples = iter(self.stream)
        while True:
            start = self.stream.state_dict() if hasattr(self.stream, "state_dict") else None
            buffer = list(itertools.islice(examples, self.buffer_size))
            if not buffer:
                break
            self._buffer_start = start
            for j, rows in enumerate(self._plan(buffer, self._buffer_index)):
                if j < self._emitted:
                    continue  # yielded before the state was saved
                self._emitted = j + 1
                if self.drop_last and len(rows) < self.batch_size:
                    self.stats["dropped_examples"] += sum(len(r) for r in rows)
                    continue
                batch = self._collate(buffer, rows)
                self.stats["batches"] += 1
                self.stats["examples"] += len(batch["ids"])
                self.stats["tokens"] += int(batch["attention_mask"].sum())
                self.stats["slots"] += batch["attention_mask"].numel()
                yield batch
            self._buffer_index += 1
            self._emitted = 0
            self._buffer_start = None

    def _plan(self, buffer: Sequence[Example], buffer_index: int) -> Plan:
        n = len(buffer)
        lengths = [len(ex) for ex, _ in buffer]
        if self.group_by_modality:
            return self._plan_by_modality(buffer, lengths, buffer_index)
        if self.packing:
            rows = pack_rows(lengths, int(self.pack_length))  # type: ignore[arg-type]
        elif self.group_by_length:
            rows = [[i] for i in sorted(range(n), key=lambda k: (lengths[k], k))]
        else:
            return [[[i] for i in range(n)]]
        batches = [rows[k: k + self.batch_size] for k in range(0, len(rows), self.batch_size)]
        random.Random(f"mmtune-batches:{self.seed}:{buffer_index}").shuffle(batches)
        return batches

    def _plan_by_modality(self, buffer: Sequence[Example], lengths: list[int], buffer_index: int) -> Plan:
        bs = self.batch_size
        batches: list[list[list[int]]] = []
        rest: list[int] = []
        for with_images in (True, False):
            group = [i for i, (ex, _) in enumerate(buffer) if bool(ex.image_spans) == with_images]
            if self.group_by_length:
                group.sort(key=lambda k: (lengths[k], k))
            full = len(group) - len(group) % bs
            batches += [[[i] for i in group[k: k + bs]] for k in range(0, full, bs)]
            rest += group[full:]
        batches += [[[i] for i in rest[k: k + bs]] for k in range(0, len(rest), bs)]
        random.Random(f"mmtune-batches:{self.seed}:{buffer_index}").shuffle(batches)
        return batches

    def _collate(self, buffer: Sequence[Example], rows: list[list[int]]) -> dict[str, Any]:
        order = [i for row in rows for i in row]  # reading order
        pixels = [img for i in order for img in buffer[i][1]]
        if self.packing:
            batch: dict[str, Any] = collate_packed([[buffer[i][0] for i in row] for row in rows],
                                                   self.pad_token_id, pixel_values=pixels)
        else:
            batch = collate_examples([buffer[i][0] for i in order], self.pad_token_id, pixel_values=pixels)
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        batch["ids"] = [buffer[i][0].id for i in order]
        batch["num_images"] = [len(buffer[i][1]) for i in order]
        return batch
