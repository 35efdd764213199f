"""The save handshake of a folder that every process writes into: one owner for checkpoints and `best/`.

`save_together(tmp, final, procs, write_each=, write_main=, commit=)`:

1. the main process makes `tmp` a fresh, empty folder (removing a stale one a
   crashed save left), and every process waits for it;
2. every process runs `write_each(tmp)` (its own files: its weight shard, its
   RNG state), then the main process runs `write_main(tmp)` (the files written
   once: model config, tokenizer, state files);
3. every process tells whether its writes succeeded; only when all did does the
   main process run `commit(tmp)`, which puts `tmp` in place of `final` (a
   rename: `replace_dir`, `commit_checkpoint`);
4. every process learns whether the commit succeeded.

Contract: it returns on every process once `final` is the new folder, and
raises on every process otherwise. The process whose step failed re-raises its
own error, the others a `CheckpointError` naming `final`; `tmp` is removed and
the previous `final` is untouched. A process that dies in the middle (SIGKILL,
the OOM killer, preemption) leaves `tmp` behind, or, when it dies inside the
commit, the previous `final` moved aside under the name the commit gave it;
the next run's `checkpoint.remove_stale_temps` removes the one and puts the
other back. Collectives inside `write_each` (DCP's sharded save) must be entered
by every process: a process that fails before them leaves the others waiting
in them, which no handshake can prevent.

Written by hand because it is mmtune's own rule for its run folder; the
collectives come from the caller (`Processes`: accelerate's barrier and
reduce in the trainer, `ONE_PROCESS` without them).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmtune.fileio import fresh_dir
from mmtune.runs import CheckpointError

log = logging.getLogger("mmtune.train")

Write = Callable[[Path], None]


@dataclass(frozen=True)
class Processes:
    """What the handshake needs from the process group.

    `wait()` is a barrier; `all_true(flag)` returns, on every process, whether
    `flag` was True on every process (both are no-ops for one process).
    """

    main: bool
    wait: Callable[[], None]
    all_true: Callable[[bool], bool]


ONE_PROCESS = Processes(main=True, wait=lambda: None, all_true=lambda flag: flag)


def _nothing(tmp: Path) -> None:
    return None


def save_together(
    tmp: Path, final: Path, procs: Processes, *, write_each: Write = _nothing, write_main: Write = _nothing,
    commit: Write,
) -> None:
    """Write `final` through the fresh folder `tmp` on every process (see the module docstring)."""
    if procs.main:
        fresh_dir(tmp)
    procs.wait()
    error = _attempt(write_each, tmp, final, "write its part")
    if procs.main and error is None:
        error = _attempt(write_main, tmp, final, "write its files")
    _agree(procs, error, tmp, final, "failed to write its part of it")
    error = _attempt(commit, tmp, final, "put it in place") if procs.main else None
    _agree(procs, error, tmp, final, "failed to put it in place")


def _attempt(step: Write, tmp: Path, final: Path, what: str) -> Exception | None:
    try:
        step(tmp)
    except Exception as exc:  # noqa: BLE001 - told to the other processes before anyone raises
        log.error("%s: this process could not %s (%s: %s)", final, what, type(exc).__name__, exc)
        return exc
    return None


def _agree(procs: Processes, error: Exception | None, tmp: Path, final: Path, what: str) -> None:
    if procs.all_true(error is None):
        return
    if procs.main:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is not None:
        raise error
    raise CheckpointError(f"{final}: another process {what} (see that process's train log); "
                          f"the previous {final.name} is unchanged")
