"""Training metrics: `metrics.jsonl`, optional TensorBoard, and the loss-curve PNG.

`metrics.jsonl` holds one JSON object per logged step
(`{"step", "loss", "lr", "tokens", "tokens_per_s", "padding_share", "skipped", ...}`),
flushed as it is written so a crashed run still shows its curve. When a run
resumes from checkpoint STEP, lines after STEP (logged by the interrupted run
after its last checkpoint) are dropped first, so the file never holds a step
twice. Only the main process writes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, TextIO

from mmtune.fileio import atomic_text, write_png
from mmtune.runs import METRICS_FILE


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete line of a metrics file (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _truncate_after(path: Path, step: int) -> None:
    rows = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    with atomic_text(path) as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def _open_log(path: Path, resume_step: int | None) -> TextIO:
    """`path` opened for appending: a fresh run starts a fresh file; a resumed one keeps the steps
    up to `resume_step` (lines the interrupted run wrote after its last checkpoint are dropped)."""
    if path.exists():
        if resume_step is None:
            path.unlink()
        else:
            _truncate_after(path, resume_step)
    return open(path, "a", encoding="utf-8")  # noqa: SIM115 - the caller keeps it open for the whole run


class MetricsLogger:
    """Appends metric rows to `DIR/metrics.jsonl` and, when installed, TensorBoard (`DIR/tb`)."""

    def __init__(self, output_dir: str | os.PathLike[str], *, enabled: bool = True,
                 resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._fh = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = _open_log(self.path, resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import (
                    SummaryWriter,  # needs the tensorboard package
                )
            except ImportError:
                self._tb = None
            else:
                self._tb = SummaryWriter(str(Path(output_dir) / "tb"), purge_step=resume_step)

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled or self._fh is None:
            return
        self._fh.write(json.dumps(row, sort_keys=False) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{key}", value, step)
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, int | float):
                            self._tb.add_scalar(f"train/{key}/{sub}", v, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def plot_loss_curve(metrics_path: str | os.PathLike[str], png_path: str | os.PathLike[str],
                    title: str | None = None) -> Path | None:
    """Draw loss (and a smoothed loss) against step into a PNG; None when nothing was logged."""
    rows = [r for r in read_metrics(metrics_path) if isinstance(r.get("loss"), int | float)]
    rows = [r for r in rows if math.isfinite(r["loss"])]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    evals = [r for r in read_metrics(metrics_path)
             if isinstance(r.get("eval_loss"), int | float) and math.isfinite(r["eval_loss"])]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=1, alpha=0.5 if len(rows) > 20 else 1.0, label="loss")
    if len(rows) > 20:
        # Exponential moving average, as TensorBoard's smoothing slider does.
        ema, smooth = losses[0], []
        for v in losses:
            ema = 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(steps, smooth, lw=2, label="loss (EMA 0.9)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", lw=1.5, ms=4,
                label="validation loss (data.eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    png_path = Path(png_path)
    try:
        write_png(fig, png_path)
    finally:
        plt.close(fig)
    return png_path


TRACE_ENV = "MMTUNE_TRACE_BATCHES"


def trace_file(rank: int) -> str:
    return "batches.jsonl" if rank == 0 else f"batches-rank{rank}.jsonl"


class BatchTrace:
    """Which records every micro-batch held: `DIR/batches.jsonl` (`batches-rankR.jsonl` per process).

    Off unless `MMTUNE_TRACE_BATCHES=1`. One line per micro-batch,
    `{"step", "micro", "ids", "num_images"}`: the answer to "what did step N
    train on", and how tests check that a resumed run sees every record exactly
    as an uninterrupted one does. Resuming drops lines after the checkpoint's step.
    """

    def __init__(self, output_dir: str | os.PathLike[str], rank: int, *, resume_step: int | None = None,
                 enabled: bool | None = None) -> None:
        self.enabled = os.environ.get(TRACE_ENV, "") not in ("", "0") if enabled is None else enabled
        self.path = Path(output_dir) / trace_file(rank)
        self._fh = None
        if not self.enabled:
            return
        self._fh = _open_log(self.path, resume_step)

    def log(self, step: int, micro: int, batch: dict[str, Any]) -> None:
        if self._fh is None:
            return
        row = {"step": step, "micro": micro, "ids": list(batch.get("ids") or []),
               "num_images": list(batch.get("num_images") or [])}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
