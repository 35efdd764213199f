"""Experiment trackers (`train.report_to`) through accelerate's tracking API.

    train:
      report_to: [tensorboard, wandb, mlflow, trackio]

`check_trackers` validates the names (did-you-mean for a typo) and fails in
one line, naming the package to install, for a tracker that is not installed,
before any model is built. `mmtune train` then passes the names to
`Accelerator(log_with=..., project_dir=DIR/trackers)`, calls
`init_trackers(run name, config=flat_config(cfg))` (the whole run config,
flattened to `section.key` scalars, as the run's hyperparameters) and logs every
metrics.jsonl row with `accelerator.log` (`tracker_values`). Local trackers
write under `DIR/trackers/` (TensorBoard event files in `DIR/trackers/NAME/`,
wandb's run folder, mlflow's database `DIR/trackers/mlflow.db` unless MLFLOW_TRACKING_URI is set);
none of them needs the network when run offline (`WANDB_MODE=offline`, mlflow's local database,
trackio's local store).
metrics.jsonl stays the record a run always writes.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Sequence
from typing import Any

from mmtune.errors import MMTuneError

# name -> (module accelerate imports, pip package to install)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
TRACKERS_DIR = "trackers"


def check_trackers(names: Sequence[str]) -> list[str]:
    """The tracker names, de-duplicated in order; one-line errors for unknown or uninstalled ones."""
    out: list[str] = []
    for name in names:
        key = str(name).strip().lower()
        if key not in TRACKERS:
            close = difflib.get_close_matches(key, list(TRACKERS), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise MMTuneError(f"train.report_to: unknown tracker {name!r}{hint} (choose from {', '.join(TRACKERS)})")
        module, package = TRACKERS[key]
        if importlib.util.find_spec(module) is None:
            raise MMTuneError(f"train.report_to: {key} is not installed; pip install {package} "
                              f"(or pip install 'mmtune[{key}]')")
        if key not in out:
            out.append(key)
    return out


def flat_config(obj: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested config (dataclass or dict) as `a.b.c` -> scalar; lists and None become strings.

    Trackers take scalars as hyperparameters (TensorBoard's hparams accepts nothing else).
    """
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    out: dict[str, bool | int | float | str] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def tracker_values(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row, nested dicts flattened (`skips/no_trainable_tokens`); `step` left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "step":
            continue
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[key] = float(value)
        elif isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    out[f"{key}/{sub}"] = float(v)
    return out
