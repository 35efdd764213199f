"""Images for records: where they are, whether they decode, how a model sees them.

Records store image paths (absolute once `mmtune convert` has resolved them) or
http(s) URLs. The importers use `resolve_image_path` and `check_image` to turn
every missing or broken image into a located reject instead of a crash in the
middle of training; the model and training code use `load_image` and
`expand_to_square` (LLaVA's pad-to-square preprocessing) to read them;
`pad_resize` is pad-to-square followed by a resize, pixel for pixel, with
less work.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from mmtune.errors import MMTuneError

URL_PREFIXES = ("http://", "https://")


class ImageError(MMTuneError):
    """An image that cannot be found or decoded (one-line message naming it)."""


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for http(s) URLs, which mmtune keeps as they are (it never downloads)."""
    return str(path).lower().startswith(URL_PREFIXES)


def resolve_image_path(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> str:
    """The absolute path of an image named in a record.

    A relative path is taken relative to `root` (the dataset's image folder; the
    current directory when None); `~` is expanded; URLs are returned unchanged.
    The result is normalized but symlinks are kept, so two records naming the
    same file through the same link stay equal strings.
    """
    text = os.fspath(path)
    if is_url(text):
        return text
    p = Path(text).expanduser()
    if not p.is_absolute():
        p = Path(root if root is not None else ".").expanduser() / p
    return os.path.normpath(os.path.abspath(p))


def check_image(path: str | os.PathLike[str]) -> str | None:
    """Why the image at `path` is unusable, or None when it is fine.

    Runs PIL's structural `verify()` and then a full decode (`load()`): verify
    alone passes truncated JPEGs, and a full decode alone misses some broken
    PNG chunks. URLs are not checked (no network); callers count them instead.
    """
    text = os.fspath(path)
    if is_url(text):
        return None
    if not os.path.exists(text):
        return f"image not found: {text}"
    if not os.path.isfile(text):
        return f"image path is not a file: {text}"
    try:
        with Image.open(text) as img:
            img.verify()
        with Image.open(text) as img:
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return f"image cannot be decoded: {text} ({detail})"
    return None


def load_image(
    source: str | os.PathLike[str] | bytes, *, exif_transpose: bool = False, draft_size: int | None = None
) -> Image.Image:
    """Decode an image file (or its raw bytes, e.g. from a webdataset shard) into RGB.

    Grayscale, palette and CMYK images become RGB the way LLaVA reads them
    (`Image.convert("RGB")`); `exif_transpose=True` also applies the camera's
    orientation tag. Raises ImageError (one line) for a missing, remote or
    undecodable image.

    `draft_size`: let a JPEG decode at a reduced scale (libjpeg's DCT scaling,
    1/2, 1/4 or 1/8) as long as both sides stay >= `draft_size` pixels, so a
    transform that resizes to `draft_size` (after padding to square or
    cropping) gets nearly the same pixels for a fraction of the decode time
    (`scripts/bench_loader.py` measures both the speed and the difference).
    Other formats decode in full.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, fp = "<bytes>", io.BytesIO(bytes(source))
    else:
        name = os.fspath(source)
        if is_url(name):
            raise ImageError(f"image {name} is a URL; mmtune does not download images")
        if not os.path.isfile(name):
            raise ImageError(f"image not found: {name}")
        fp = name
    try:
        with Image.open(fp) as img:
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (int(draft_size), int(draft_size)))
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return img if img.mode == "RGB" else img.convert("RGB")  # convert() of RGB would only copy it
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageError(f"image cannot be decoded: {name} ({detail})") from None


def background_from_mean(mean: Sequence[float]) -> tuple[int, int, int]:
    """An image processor's normalization mean (floats in [0, 1]) as an RGB fill colour.

    LLaVA pads with the mean colour so that, after normalization, the padding is
    (nearly) zero; like LLaVA's `tuple(int(x * 255) for x in image_mean)` it truncates.
    """
    if len(mean) != 3:
        raise ValueError(f"expected 3 channel means, got {len(mean)}")
    r, g, b = (int(float(m) * 255) for m in mean)
    return r, g, b


def expand_to_square(img: Image.Image, background_rgb: Sequence[int] = (0, 0, 0)) -> Image.Image:
    """Pad an image to a square, centring it on a `background_rgb` canvas.

    This is LLaVA-1.5's `expand2square` ("pad" aspect ratio): the whole image
    stays visible instead of being centre-cropped by the vision processor. A
    square image is returned unchanged; RGB, RGBA and L images keep their mode,
    any other mode is converted to RGB first.
    """
    width, height = img.size
    if width == height:
        return img
    if img.mode not in ("RGB", "RGBA", "L"):
        img = img.convert("RGB")
    r, g, b = (int(c) for c in background_rgb)
    fill: int | tuple[int, ...] = {"RGB": (r, g, b), "RGBA": (r, g, b, 255), "L": r}[img.mode]
    side = max(width, height)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


# Pillow's filter supports (its Resample.c), which set how far each output pixel's input window reaches.
# BOX is left out: its weights jump from 1 to 0 at the window's edge, where the box's rounding shows.
_FILTER_SUPPORT = {Image.Resampling.BICUBIC: 2.0, Image.Resampling.BILINEAR: 1.0, Image.Resampling.LANCZOS: 3.0,
                   Image.Resampling.HAMMING: 1.0}


def _photo_band(n_in: int, n_out: int, lo: int, hi: int, support: float) -> tuple[int, int, int, int]:
    """For one resampling pass of n_in -> n_out pixels whose input is padding outside [lo, hi):
    (j0, j1, a, b) such that every output outside [j0, j1) reads padding only, and inputs [a, b)
    hold the whole window of every output in [j0, j1).

    Pillow computes an output's window and weights from `box_start + (j + 0.5) * scale` and
    takes the box as float32, so a box starting at output j0 gives the full pass's pixels only
    when j0 * n_in / n_out is exact in float32: j0 and j1 are rounded outwards to multiples of
    the odd part of n_out / gcd(n_in, n_out), which makes it a dyadic fraction. The band is
    otherwise a little wider than needed; that only costs time.
    """
    scale = n_in / n_out
    reach = support * max(scale, 1.0)
    j0 = max(0, int((lo - reach - 1) / scale) - 2)
    j1 = min(n_out, math.ceil((hi + reach + 1) / scale) + 2)
    step = n_out // math.gcd(n_in, n_out)
    while step % 2 == 0:
        step //= 2
    j0, j1 = j0 // step * step, min(n_out, -(-j1 // step) * step)
    a = max(0, int((j0 + 0.5) * scale - reach + 0.5) - 1)
    b = min(n_in, int((j1 - 0.5) * scale + reach + 0.5) + 2)
    return j0, j1, a, b


@functools.lru_cache(maxsize=64)  # a dataset has few canvas sizes; building this costs ~8x copying it
def _padding_square(n: int, size: int, fill: tuple[int, int, int], resample: int
                    ) -> tuple[tuple[int, ...], Image.Image] | None:
    """What an n x n canvas of `fill` resamples to, for `pad_resize`: (the padding row after the
    horizontal pass, the size x size image of padding-only outputs), or None when Pillow's
    fixed-point weights do not resample a constant row to a constant (then `pad_resize` takes the
    plain path). Cached: callers copy the image and never modify it."""
    line = Image.new("RGB", (n, 1), fill).resize((size, 1), resample)
    lo, hi = zip(*line.getextrema(), strict=True)
    if lo != hi:
        return None
    # a padding column's vertical pass, repeated along each row
    column = Image.new("RGB", (1, n), lo).resize((1, size), resample)
    return lo, column.resize((size, size), Image.Resampling.NEAREST)


def pad_resize(img: Image.Image, background_rgb: Sequence[int], size: int,
               resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """`expand_to_square(img, background_rgb).resize((size, size), resample)`, bit for bit, with about
    the work of resizing the photo alone.

    Hand-written because no library offers it. Pillow resamples in two separable passes into an
    8-bit intermediate, horizontal first, with coefficients that depend only on the input and
    output sizes (and the box). The padded canvas is n x n (n = the longer side); along the
    padded axis, an output pixel whose input window holds padding only is the padding colour
    resampled, the same along the other axis. So only the band of outputs that reach the photo
    is resampled (Pillow's `box`, on a canvas cut to the inputs those outputs read), and the
    rest is filled from the padding colour's own resample:

    - wide (w > h): the horizontal pass on the photo's h rows (`img.resize((size, h))`), padding
      rows filled, then the vertical pass for the band of rows only;
    - tall (h > w): both passes for the band of columns only.

    Square images, other modes and filters and canvases already `size` wide take the plain path.
    tests/test_pixels.py compares both paths over many sizes and filters.
    """
    w, h = img.size
    support = _FILTER_SUPPORT.get(resample)  # type: ignore[call-overload]
    if w == h or max(w, h) == size or img.mode != "RGB" or support is None:
        return expand_to_square(img, background_rgb).resize((size, size), resample)
    fill = tuple(int(c) for c in background_rgb)
    n = max(w, h)
    padding = _padding_square(n, size, fill, resample)  # type: ignore[arg-type]
    if padding is None:
        return expand_to_square(img, background_rgb).resize((size, size), resample)
    lo, square = padding
    out = square.copy()
    scale = n / size
    if w > h:
        top = (w - h) // 2
        j0, j1, a, b = _photo_band(n, size, top, top + h, support)
        rows = Image.new("RGB", (size, b - a), lo)  # canvas rows a..b after the horizontal pass
        rows.paste(img.resize((size, h), resample), (0, top - a))
        out.paste(rows.resize((size, j1 - j0), resample, box=(0, j0 * scale - a, size, j1 * scale - a)), (0, j0))
        return out
    left = (h - w) // 2
    j0, j1, a, b = _photo_band(n, size, left, left + w, support)
    cols = Image.new("RGB", (b - a, h), fill)  # type: ignore[arg-type]  # canvas columns a..b
    cols.paste(img, (left - a, 0))
    band = cols.resize((j1 - j0, h), resample, box=(j0 * scale - a, 0, j1 * scale - a, h))  # horizontal pass
    out.paste(band.resize((j1 - j0, size), resample), (j0, 0))  # vertical pass, the band's columns only
    return out
