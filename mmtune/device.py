"""Device strings from the command line or a config, checked before any work starts.

`resolve_device` turns `None` into the default (cuda when a GPU is visible,
else cpu) and refuses, in one line, a string torch cannot parse (`foo`), a
device type mmtune does not run on, a GPU on a machine without one, and a GPU
index past the last one (`cuda:99` on a 1-GPU machine). Imports nothing from
mmtune but `errors`.
"""

from __future__ import annotations

from mmtune.errors import MMTuneError


def resolve_device(name: str | None, flag: str = "--device") -> str:
    """The device to use, as a string torch accepts; a bad one is a one-line MMTuneError naming `flag`."""
    import torch

    if name is None or str(name).strip() == "":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(str(name))
    except (RuntimeError, ValueError):
        raise MMTuneError(f"{flag} {name!r}: not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MMTuneError(f"{flag} {name}: this machine has no CUDA GPU that torch {torch.__version__} can use; "
                              f"use {flag} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise MMTuneError(f"{flag} {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise MMTuneError(f"{flag} {name}: MPS (Apple GPU) is not available here; use {flag} cpu")
    elif device.type != "cpu":
        raise MMTuneError(f"{flag} {name}: mmtune runs on cpu, cuda or mps, not {device.type}")
    return str(device)
