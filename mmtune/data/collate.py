"""Tokenized examples -> padded tensors (the batch dict every model call takes).

A batch is a dict with `input_ids`, `attention_mask`, `labels` ([B, T] each)
and, when any example has images, `pixel_values` ([N_images, 3, H, W], the
images of the batch in reading order: row by row, left to right). Rows are
right-padded for training and left-padded for generation, so new tokens line
up at the end of every row.

`stack_images` stacks a batch's images. uint8 images from a tower's loader
transform are [3, H, W] views of PIL's HWC bytes; they are stacked as those
bytes, so `pixel_values` is then channels-last in memory ([N, 3, H, W] with
strides of [N, H, W, 3]): the same values, without the per-image transpose
that made the stack the main process's costliest step after decoding
(scripts/bench_loader.py). The tower's `PixelNorm` turns them into a
contiguous float tensor on the device, so the model sees what it did before.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch

from mmtune.data.encode import IGNORE_INDEX, TokenizedExample


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_value: int, *, side: str = "right", length: int | None = None
) -> torch.Tensor:
    """Stack int sequences into a [B, T] LongTensor padded to the longest (or `length`)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max([len(s) for s in seqs] + [length or 0])
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        # array('q') converts a list of ints in C, several times faster than torch's sequence parsing
        if isinstance(s, list | tuple):
            t = torch.frombuffer(array("q", s), dtype=torch.long)
        else:
            t = torch.as_tensor(list(s), dtype=torch.long)
        if side == "right":
            out[i, : len(s)] = t
        else:
            out[i, width - len(s):] = t
    return out


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """`torch.stack(images)`, equal in values; [3, H, W] views of HWC memory are stacked as HWC (channels-last)."""
    images = list(images)
    hwc = [t.permute(1, 2, 0) for t in images]
    if images and all(t.ndim == 3 and h.is_contiguous() and not t.is_contiguous() for t, h in zip(images, hwc, strict=True)):
        return torch.stack(hwc).permute(0, 3, 1, 2)  # [N, H, W, 3] memory -> [N, 3, H, W] view, no transpose
    return torch.stack(images)


def collate_examples(
    examples: Sequence[TokenizedExample],
    pad_token_id: int,
    *,
    pixel_values: Sequence[torch.Tensor] | None = None,
    side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pad a list of examples into a training batch.

    `pixel_values` holds one [3, H, W] tensor per image, already in reading
    order; it must count exactly the image runs in the examples.
    """
    ids = pad_sequences([e.input_ids for e in examples], pad_token_id, side=side)
    labels = pad_sequences([e.labels for e in examples], IGNORE_INDEX, side=side)
    lengths = torch.tensor([len(e) for e in examples], dtype=torch.long)
    cols = torch.arange(ids.shape[1])
    mask = (cols < lengths[:, None] if side == "right" else cols >= ids.shape[1] - lengths[:, None]).long()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    n_images = sum(len(e.image_spans) for e in examples)
    if pixel_values is not None and len(pixel_values) != n_images:
        raise ValueError(f"batch has {n_images} image runs but {len(pixel_values)} images")
    if n_images:
        if pixel_values is None:
            raise ValueError(f"batch has {n_images} image runs but no pixel_values")
        batch["pixel_values"] = stack_images(pixel_values)
    return batch


def padding_share(batch: dict[str, torch.Tensor]) -> float:
    """Fraction of the batch's token slots that are padding (what length grouping reduces)."""
    mask = batch["attention_mask"]
    return 1.0 - float(mask.sum()) / max(1, mask.numel())
