"""Validation loss during training: `data.eval` files, every `train.eval_every` steps.

`ValidationSet` reads the eval records with the training pipeline itself
(`ExampleStream` -> `Batcher` with the run's template, lengths and packing;
no shuffling, one pass, length grouping off), so the validation loss is the
training loss on other data. Each process takes its share of the records
(`ExampleStream`'s split by line / shard) and `train.eval_samples` caps the
total (0 = the whole set). The loss is token-weighted: each batch's mean
loss times its number of predicted tokens, summed over batches and processes
and divided by the total, so it does not depend on how the set was batched.

Evaluation leaves training exactly as it was: the model goes back to train
mode and every RNG state is restored, so a run with validation trains on the
same batches with the same losses as one without.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mmtune.config import RunConfig
from mmtune.errors import MMTuneError


@dataclass
class ValidationResult:
    loss: float
    examples: int
    tokens: int


class ValidationSet:
    """The eval records of a run as batches, rebuilt for every evaluation (so no batch sits in memory)."""

    def __init__(self, cfg: RunConfig, bundle: Any, *, rank: int, world_size: int) -> None:
        if not cfg.data.eval:
            raise MMTuneError("data.eval is empty: nothing to validate on")
        self.cfg, self.bundle, self.rank, self.world = cfg, bundle, rank, world_size
        cap = cfg.train.eval_samples
        self.per_rank = math.ceil(cap / world_size) if cap > 0 else None

    def _batches(self) -> Any:
        from mmtune.data.batching import Batcher
        from mmtune.data.stream import EmptyShareError, ExampleStream

        dc = self.cfg.data
        try:
            stream = ExampleStream(
                dc.eval, self.bundle.tokenizer, dc.template, max_length=dc.max_length,
                num_image_tokens=self.bundle.num_image_tokens,
                image_transform=self.bundle.pixel_transform or self.bundle.image_transform,
                image_root=dc.image_root, shuffle=False, seed=0, epochs=1, rank=self.rank, world_size=self.world,
            )
        except EmptyShareError:
            # Fewer eval records than processes: for training that is an error, here this process's
            # share is simply empty (the others' records are still counted; under FSDP it pads).
            if self.world == 1:
                raise
            return []
        if self.per_rank is not None:
            stream = _Capped(stream, self.per_rank)
        return Batcher(stream, batch_size=self.cfg.train.batch_size, pad_token_id=self.bundle.tokenizer.pad_token_id,
                       group_by_length=False, packing=dc.packing, pack_length=dc.max_length if dc.packing else None)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: Any,
                 reduce_sum: Callable[[torch.Tensor], torch.Tensor],
                 equal_steps: Callable[[int], int] | None = None, progress: bool = False) -> ValidationResult:
        """Token-weighted mean loss of `model` over the set (summed over processes by `reduce_sum`).

        `equal_steps(n)` (the largest n over processes), when given, makes every process run the
        same number of forward passes: a sharded model (FSDP) gathers its weights collectively in
        each forward, so a process with fewer batches repeats its last one, counted with weight 0
        (a process with none runs a one-token text batch with no label, also not counted).
        """
        from tqdm.auto import tqdm

        from mmtune.data.batching import model_inputs
        from mmtune.data.encode import IGNORE_INDEX
        from mmtune.train import checkpoint as ckpt

        rng = ckpt.capture_rng_state()
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        tokens = examples = 0
        try:
            batches: Any = self._batches()
            if equal_steps is not None:
                batches = list(batches)
                extra = equal_steps(len(batches)) - len(batches)
                padding = [(batches[-1] if batches else self._filler(), False)] * extra
                batches = [(b, True) for b in batches] + padding
            else:
                batches = ((b, True) for b in batches)
            for batch, counted in tqdm(batches, desc="validation", unit="batch", leave=False, disable=not progress):
                n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if counted else 0
                if n == 0 and equal_steps is None:
                    continue
                inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                          for k, v in model_inputs(batch).items()}
                loss = model(**inputs).loss
                if n == 0:
                    continue
                loss_sum += loss.double() * n
                tokens += n
                examples += len(batch["ids"])
        finally:
            model.train(was_training)
            ckpt.restore_rng_state(rng)
        total = reduce_sum(torch.cat([loss_sum.reshape(1),
                                      torch.tensor([tokens, examples], dtype=torch.float64, device=device)]))
        loss_total, tok_total, ex_total = total.cpu().tolist()
        if tok_total == 0:
            raise MMTuneError(f"data.eval ({', '.join(self.cfg.data.eval)}) gave no example with an answer token")
        return ValidationResult(loss_total / tok_total, int(ex_total), int(tok_total))


    def _filler(self) -> dict[str, Any]:
        """A batch for a process that holds no eval record: one pad token, no image, no label (never counted)."""
        from mmtune.data.encode import IGNORE_INDEX

        pad = self.bundle.tokenizer.pad_token_id
        return {"input_ids": torch.tensor([[pad if pad is not None else 0]]),
                "attention_mask": torch.ones(1, 1, dtype=torch.long),
                "labels": torch.full((1, 1), IGNORE_INDEX), "ids": []}


class _Capped:
    """The first `limit` examples of a stream (it keeps `tokenizer` / `max_length` for the Batcher)."""

    def __init__(self, stream: Any, limit: int) -> None:
        self.stream, self.limit = stream, limit
        self.tokenizer, self.max_length = stream.tokenizer, stream.max_length

    def __iter__(self) -> Any:
        for n, example in enumerate(self.stream):
            if n >= self.limit:
                return
            yield example
