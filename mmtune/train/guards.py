"""What stops a training run cleanly, and the hooks that let tests provoke it.

`StopSignal` (SIGTERM/SIGINT -> save, then exit), `NonFiniteLossError`,
`TrainingOOMError` with `oom_message` / `describe_batch`, and `FaultInjector`,
which provokes the rare events (a kill in the middle of a checkpoint save, an
out-of-memory error, a NaN loss, a SIGTERM) at a chosen step through the
`MMTUNE_FAULT_INJECT` environment variable. What to train with (optimizer,
schedule, precision) is in `mmtune.train.optim`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import torch

from mmtune.config import DataConfig, TrainConfig
from mmtune.errors import MMTuneError

log = logging.getLogger("mmtune.train")

FAULT_ENV = "MMTUNE_FAULT_INJECT"
FAULT_KINDS = ("sigterm", "kill_during_save", "kill_during_best_save", "oom", "nan")
KILL_KINDS = ("kill_during_save", "kill_during_best_save")


class NonFiniteLossError(MMTuneError):
    """The loss (or gradient norm) became NaN/inf; the run stopped without saving that step."""


class TrainingOOMError(MMTuneError):
    """Out of memory at a step; the message names the batch and what to lower."""


# --------------------------------------------------------------------------- #
# Signals
# --------------------------------------------------------------------------- #


class StopSignal:
    """Turns SIGTERM (and SIGINT) into a flag the loop checks after each step.

    The loop then saves a checkpoint and exits; a second SIGINT interrupts at
    once. Handlers are installed only in the main thread (Python's rule) and
    the previous ones are restored on exit.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received %s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)

    def __enter__(self) -> StopSignal:  # noqa: PYI034 - not subclassed
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()


# --------------------------------------------------------------------------- #
# Fault injection (tests)
# --------------------------------------------------------------------------- #


class FaultInjector:
    """Provoke rare events at a given step: `MMTUNE_FAULT_INJECT="kind@step[,kind@step...]"`.

    Kinds: `sigterm` (send SIGTERM to this process after the step),
    `kill_during_save` (SIGKILL this process halfway through writing that
    step's checkpoint), `kill_during_best_save` (the same while writing
    `best/` after that step's validation, when it is a new best; the model
    files are written, best.json is not), `oom` (raise torch.OutOfMemoryError in that step's
    forward), `nan` (make that step's loss NaN). An optional `:rank` suffix
    limits a fault to one process, e.g. `sigterm@3:1`.
    """

    def __init__(self, spec: str | None = None, rank: int = 0) -> None:
        spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
        self.faults: dict[str, set[int]] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            try:
                kind, rest = part.split("@", 1)
                step_text, _, rank_text = rest.partition(":")
                step = int(step_text)
                only_rank = int(rank_text) if rank_text else None
            except ValueError:
                raise MMTuneError(f"{FAULT_ENV}: cannot parse {part!r} (want kind@step or kind@step:rank)") from None
            if kind not in FAULT_KINDS:
                raise MMTuneError(f"{FAULT_ENV}: unknown fault {kind!r} (have: {', '.join(FAULT_KINDS)})")
            if only_rank is None or only_rank == rank:
                self.faults.setdefault(kind, set()).add(step)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def at(self, kind: str, step: int) -> bool:
        return step in self.faults.get(kind, ())

    def maybe_oom(self, step: int) -> None:
        if self.at("oom", step):
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_ENV} at step {step})")

    def maybe_nan(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self.at("nan", step) else loss

    def maybe_sigterm(self, step: int) -> None:
        if self.at("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)

    def maybe_kill(self, kind: str, step: int) -> None:
        """SIGKILL this process (no clean-up, as a crash or preemption) when `kind` is injected at `step`."""
        if kind not in KILL_KINDS:
            raise ValueError(f"not a kill fault: {kind!r} (have: {', '.join(KILL_KINDS)})")
        if self.at(kind, step):
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- #
# Messages
# --------------------------------------------------------------------------- #


def describe_batch(batch: dict[str, Any], max_ids: int = 8) -> str:
    """`ids [...] (lengths [...], padded to T tokens, N images)` for error messages."""
    ids = list(batch.get("ids") or [])
    mask = batch.get("attention_mask")
    lengths = [int(x) for x in mask.sum(dim=1).tolist()] if isinstance(mask, torch.Tensor) else []
    width = int(batch["input_ids"].shape[1]) if isinstance(batch.get("input_ids"), torch.Tensor) else 0
    n_img = sum(batch.get("num_images") or [])
    shown = ids[:max_ids] + ([f"... {len(ids) - max_ids} more"] if len(ids) > max_ids else [])
    return f"ids {shown} (row lengths {lengths[:max_ids]}, padded to {width} tokens, {n_img} image(s))"


def oom_message(step: int, micro: int, grad_accum: int, batch: dict[str, Any], tc: TrainConfig, dc: DataConfig) -> str:
    """What ran out of memory and which knobs to turn, in one line."""
    where = f"step {step}" + (f" (micro-batch {micro}/{grad_accum})" if grad_accum > 1 else "")
    tips = [f"train.batch_size (now {tc.batch_size}; raise train.grad_accum to keep the effective batch)",
            f"data.max_length (now {dc.max_length})"]
    if not tc.gradient_checkpointing:
        tips.append("or set train.gradient_checkpointing=true")
    if tc.mixed_precision in ("no",) and torch.cuda.is_available():
        tips.append("or use train.mixed_precision=bf16")
    return f"out of memory at {where} on batch {describe_batch(batch)}; lower " + ", ".join(tips)


def free_accelerator_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
