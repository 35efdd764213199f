"""Condensed data selection: the Python API (`select_records`, `select_pool`).

Its command line, `mmtune select`, is `mmtune.cli.select`.

    from mmtune.select import select_records
    result = select_records(records, k=1000, method="qdit", alpha=0.5, report_dir="report/")
    result.records      # the subset, in selection order (ids preserved)
    result.indices      # their positions in `records`
    result.objective    # facility location of the subset over the pool (exact)

The same code serves text-only and image+text pools: image+text records are
embedded with a text encoder and an open_clip image tower (see `embed.py`).
Records that cannot take part are counted skips, never silent: records with no
assistant text, and records whose image is missing or undecodable. Everything
else that is wrong (an empty pool, k larger than what is left, a bad
`--embeddings` file) is a one-line `MMTuneError`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmtune.config import SelectConfig
from mmtune.data.schema import Record, RejectsWriter, write_records
from mmtune.select.algorithms import (
    METHODS,
    MethodInputs,
    SelectionError,
    SelectParams,
    dedup,
    kmeans_assign,
)
from mmtune.select.embed import (
    TEXT_FIELDS,
    Encoder,
    ImageEncoder,
    TextEncoder,
    check_embeddings,
    embed_records,
    load_embeddings,
)
from mmtune.select.facility import DIVERSITY_NORMS, facility_objective
from mmtune.select.quality import (
    QualityScorer,
    build_scorer,
    normalise,
)


@dataclass
class SelectionResult:
    """A selection: the subset, where it came from in the pool, and what it cost."""

    records: list[Record]  # the subset, in selection order
    indices: np.ndarray  # positions of the subset in the input records
    method: str
    k: int
    params: dict[str, Any]
    objective: float | None  # facility location over the usable pool; None when nothing was embedded
    seconds: float  # the method alone
    timings: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # what selection.json holds
    skip_reasons: list[tuple[int, str]] = field(default_factory=list)  # (position in the input, why)


def select_config(config: SelectConfig | None = None, **options: Any) -> SelectConfig:
    """`config` (default: SelectConfig()) with the given fields replaced; None values keep `config`'s.

    An unknown option fails naming the closest field (as config keys do).
    """
    import difflib

    base = config if config is not None else SelectConfig()
    names = {f.name for f in dataclasses.fields(SelectConfig)}
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SelectionError(f"unknown selection option {key!r}{hint}")
    given = {key: _path_str(v) for key, v in options.items() if v is not None}
    return dataclasses.replace(base, **given)


def _path_str(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _check_k(k: int | None, method: str) -> None:
    if method not in METHODS:
        raise SelectionError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1):
        raise SelectionError(f"k must be a positive integer, got {k!r}")
    if k is None and METHODS[method].needs_k:
        raise SelectionError(f"method {method} needs k (--k)")
    if k is not None and not METHODS[method].takes_k:
        raise SelectionError(f"method {method} keeps every non-duplicate and takes no --k; use --dedup TAU "
                             "with another method to deduplicate and then pick k")


def select_records(
    records: Sequence[Record],
    k: int | None = None,
    method: str | None = None,
    *,
    config: SelectConfig | None = None,
    quality: str | QualityScorer | np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    text_encoder: Encoder | str | None = None,
    image_encoder: Encoder | None = None,
    pool_name: str | None = None,
    **options: Any,
) -> SelectionResult:
    """Select `k` records from `records` with `method` (see `METHODS`), as `config` (a SelectConfig) says.

    Any SelectConfig field may also be given as a keyword (`alpha=0.3`), over `config`'s value.
    quality: a scorer name ("length" default, "reward", "judge", "field"), a
      scorer object, or raw scores (one per record). Normalised to [0, 1].
    embeddings: precomputed (len(records) x d), rows in record order; else the
      records are embedded with `text_encoder` (an Encoder, a model name/path,
      or None for all-MiniLM-L6-v2) and, for records with images,
      `image_encoder` (e.g. `ImageEncoder("ViT-B-32", "openai")`).
    dedup_threshold: drop exact and near duplicates (cosine >= threshold) first.
    similarity, neighbors: facility/qdit similarity structure ("auto": the exact
      dense matrix while it fits 1 GB, else each record's `neighbors` nearest).
    report_dir: write selection.json and the plots there.
    """
    cfg = select_config(config, k=k, method=method, quality=quality if isinstance(quality, str) else None,
                        text_encoder=text_encoder if isinstance(text_encoder, str) else None, **options)
    # The body reads the settings under their keyword names.
    k, method, alpha, seed, device, progress = cfg.k, cfg.method, cfg.alpha, cfg.seed, cfg.device, cfg.progress
    quality = quality if quality is not None and not isinstance(quality, str) else cfg.quality
    text_encoder = text_encoder if text_encoder is not None and not isinstance(text_encoder, str) else cfg.text_encoder
    quality_model, quality_field, judge_scale = cfg.quality_model, cfg.quality_field, cfg.judge_scale
    diversity_norm, min_quality, max_similarity = cfg.diversity_norm, cfg.min_quality, cfg.max_similarity
    clusters, dedup_threshold, text_field, text_only = cfg.clusters, cfg.dedup_threshold, cfg.text_field, cfg.text_only
    image_root, cache_path, similarity, neighbors = cfg.image_root, cfg.cache_path, cfg.similarity, cfg.neighbors
    report_dir, trust_remote_code = cfg.report_dir, cfg.trust_remote_code
    t_start = time.perf_counter()
    _check_k(k, method)
    if text_field not in TEXT_FIELDS:
        raise SelectionError(f"text field must be one of {', '.join(TEXT_FIELDS)}, got {text_field!r}")
    if diversity_norm not in DIVERSITY_NORMS:
        raise SelectionError(f"diversity norm must be one of {', '.join(DIVERSITY_NORMS)}, got {diversity_norm!r}")
    if not 0.0 <= alpha <= 1.0:
        raise SelectionError(f"alpha must be in [0, 1], got {alpha}")
    records = list(records)
    if not records:
        raise SelectionError(f"{pool_name or 'the pool'} is empty: no records to select from")
    spec = METHODS[method]
    timings: dict[str, float] = {}
    skipped: dict[str, int] = {}
    skip_reasons: list[tuple[int, str]] = []

    # ---- precomputed embeddings are checked against the whole pool, before any skip
    if embeddings is not None:
        embeddings = check_embeddings(np.asarray(embeddings), len(records), where="embeddings")
    raw_quality = None
    if isinstance(quality, np.ndarray | list | tuple):
        raw_quality = np.asarray(quality, dtype=np.float64)
        if raw_quality.shape != (len(records),):
            raise SelectionError(f"got {raw_quality.size} quality scores for {len(records)} records")
        if not np.isfinite(raw_quality).all():
            bad = int(np.flatnonzero(~np.isfinite(raw_quality))[0])
            raise SelectionError(f"quality score of record {records[bad].id!r} is not a finite number")

    # ---- records that cannot be trained on are counted skips
    rows = [i for i, r in enumerate(records) if r.assistant_text().strip()]
    if len(rows) < len(records):
        skipped["no_assistant_text"] = len(records) - len(rows)
        skip_reasons += [(i, "no assistant text") for i in sorted(set(range(len(records))) - set(rows))]

    need_emb = spec.needs_embeddings or dedup_threshold is not None or report_dir is not None
    X: np.ndarray | None = None
    if need_emb and rows:
        t0 = time.perf_counter()
        if embeddings is not None:
            X = embeddings[rows]
        else:
            X, bad = _embed(
                [records[i] for i in rows], text_encoder=text_encoder, image_encoder=image_encoder,
                text_field=text_field, text_only=text_only, image_root=image_root, cache_path=cache_path,
                device=device, progress=progress, trust_remote_code=trust_remote_code,
            )
            if bad:
                skipped["image_unreadable"] = len(bad)
                skip_reasons += [(rows[j], why) for j, why in sorted(bad.items())]
                keep = np.setdiff1d(np.arange(len(rows)), np.fromiter(bad, dtype=np.int64))
                rows = [rows[j] for j in keep]
                X = X[keep]
        timings["embed_seconds"] = round(time.perf_counter() - t0, 3)

    usable = [records[i] for i in rows]
    q_norm: np.ndarray | None = None
    q_raw: np.ndarray | None = None
    scorer_name = None
    need_q = spec.needs_quality or dedup_threshold is not None
    if need_q and usable:
        t0 = time.perf_counter()
        if raw_quality is not None:
            q_raw, scorer_name = raw_quality[rows], "given"
        else:
            scorer = quality if (quality is not None and not isinstance(quality, str)) else build_scorer(
                quality, model=quality_model, field=quality_field, judge_scale=judge_scale, device=device,
                trust_remote_code=trust_remote_code,
            )
            scorer_name = scorer.name
            q_raw = np.asarray(scorer.score(usable, progress=progress), dtype=np.float64)
            if not np.isfinite(q_raw).all():
                bad_q = int(np.flatnonzero(~np.isfinite(q_raw))[0])
                raise SelectionError(f"quality scorer {scorer.name} gave a non-finite score to record "
                                     f"{usable[bad_q].id!r}")
        q_norm = normalise(q_raw)
        timings["quality_seconds"] = round(time.perf_counter() - t0, 3)

    # ---- optional dedup before the method
    dedup_info = None
    if dedup_threshold is not None and usable:
        assert X is not None and q_norm is not None and q_raw is not None
        t0 = time.perf_counter()
        keep, dedup_info = dedup(usable, X, q_norm, dedup_threshold)
        skipped["duplicates_removed"] = len(usable) - len(keep)
        rows = [rows[j] for j in keep]
        usable = [usable[j] for j in keep]
        X, q_norm, q_raw = X[keep], q_norm[keep], q_raw[keep]
        timings["dedup_seconds"] = round(time.perf_counter() - t0, 3)

    n = len(usable)
    if n == 0:
        raise SelectionError(f"{pool_name or 'the pool'}: no usable records left ({skips_text(skipped)})")
    if k is not None and k > n:
        extra = f"; {skips_text(skipped)}" if skipped else ""
        raise SelectionError(
            f"k={k} but only {n} usable record(s) in {pool_name or 'the pool'} ({len(records)} read{extra})"
        )

    params = SelectParams(k=k, alpha=alpha, diversity_norm=diversity_norm, min_quality=min_quality,
                          max_similarity=max_similarity, clusters=clusters, similarity=similarity, neighbors=neighbors, seed=seed)

    def need(what: str):
        raise AssertionError(f"method {method} read {what} without declaring it")  # a registry bug, not input

    inputs = MethodInputs(
        usable,
        get_embeddings=(lambda: X) if X is not None else (lambda: need("embeddings")),
        get_quality=(lambda: q_norm) if q_norm is not None else (lambda: need("quality")),
        params=params, device=device, progress=progress,
    )
    t0 = time.perf_counter()
    out = spec.fn(inputs)
    seconds = time.perf_counter() - t0
    local = np.asarray(out.indices, dtype=np.int64)
    if k is not None and len(local) != k:
        raise AssertionError(f"method {method} returned {len(local)} records for k={k}")
    indices = np.asarray([rows[j] for j in local], dtype=np.int64)

    objective = None
    if X is not None:
        t0 = time.perf_counter()
        objective = facility_objective(X, local, device=device)
        timings["objective_seconds"] = round(time.perf_counter() - t0, 3)
    timings["select_seconds"] = round(seconds, 3)
    timings["total_seconds"] = round(time.perf_counter() - t_start, 3)

    info = {key: v for key, v in out.info.items() if key != "labels"}  # labels go to the report only
    param_dict = {"method": method, "k": k, "seed": seed}
    if spec.needs_quality or need_q:
        param_dict["quality"] = scorer_name
    if method == "qdit":
        param_dict.update(alpha=alpha, diversity_norm=diversity_norm)
    if method in ("facility", "qdit"):
        param_dict.update(similarity=info.get("similarity"), neighbors=info.get("neighbors"))
    if method == "quality" and min_quality is not None:
        param_dict["min_quality"] = min_quality
    if method in ("deita", "dedup"):
        param_dict["max_similarity"] = info.get("max_similarity")
    if method == "kmeans":
        param_dict["clusters"] = info.get("clusters")
    if dedup_threshold is not None:
        param_dict["dedup_threshold"] = dedup_threshold
    if X is not None:
        param_dict["text_field"] = text_field

    summary: dict[str, Any] = {
        "method": method,
        "parameters": param_dict,
        "k": len(indices),
        "pool": {"name": pool_name, "records": len(records), "usable": n, "skipped": skipped,
                 "skipped_examples": [{"id": records[i].id, "reason": why} for i, why in skip_reasons[:20]]},
        "objective": {
            "facility_location": objective,
            "facility_location_mean": None if objective is None else objective / n,
            "definition": "sum over the usable pool of the max clipped cosine similarity to the subset",
        },
        "seconds": timings,
        "method_info": info,
    }
    if q_norm is not None:
        summary["objective"]["quality_mean_subset"] = float(q_norm[local].mean())
        summary["objective"]["quality_mean_pool"] = float(q_norm.mean())
    if dedup_info is not None:
        summary["dedup"] = dedup_info
    subset = [records[i] for i in indices]
    result = SelectionResult(
        records=subset, indices=indices, method=method, k=len(indices), params=param_dict, objective=objective,
        seconds=seconds, timings=timings, skipped=skipped, info=info, summary=summary,
    )
    result.skip_reasons = skip_reasons
    if report_dir is not None:
        from mmtune.select.report import write_report

        labels = out.info.get("labels")
        if labels is None and X is not None:
            labels, _ = kmeans_assign(X, min(20, n), seed=seed)
        result.summary = write_report(report_dir, summary=summary, records=usable, selected=local, embeddings=X,
                                      labels=labels, seed=seed)
    return result


def skips_text(skipped: dict[str, int]) -> str:
    """Counted skips as one phrase for a message: "3 no assistant text, 1 missing image skipped"."""
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items()) + " skipped" if skipped else "none skipped"


def _embed(records, *, text_encoder, image_encoder, text_field, text_only, image_root, cache_path, device,
           progress, trust_remote_code) -> tuple[np.ndarray, dict[int, str]]:
    if text_encoder is None or isinstance(text_encoder, str):
        text_encoder = TextEncoder(text_encoder, device=device, trust_remote_code=trust_remote_code)
    if text_only:
        records = [Record(**{**r.__dict__, "images": []}) for r in records]
    return embed_records(records, text_encoder=text_encoder, image_encoder=image_encoder, text_field=text_field,
                         image_root=image_root, cache_path=cache_path, progress=progress)


# --------------------------------------------------------------------------- #
# Files in, files out
# --------------------------------------------------------------------------- #


def select_pool(
    pool: str | os.PathLike[str],
    k: int | None,
    method: str = "qdit",
    *,
    out: str | os.PathLike[str] | None = None,
    embeddings_file: str | os.PathLike[str] | None = None,
    cache: bool = True,
    image_root: str | os.PathLike[str] | None = None,
    fmt: str = "auto",
    rejects: str | os.PathLike[str] | None = None,
    text_model: str | None = None,
    image_model: str | None = None,
    image_pretrained: str | None = None,
    **kwargs: Any,
) -> SelectionResult:
    """Read a pool file (unified JSONL, a raw format, or shards), select, write the subset to `out`."""
    from mmtune.select.pool import copy_selected_images, load_pool

    _check_k(k, method)
    loaded = load_pool(pool, image_root=image_root, fmt=fmt)
    try:
        embeddings = load_embeddings(embeddings_file, len(loaded.records)) if embeddings_file else None
        device = kwargs.get("device")
        text_encoder = None if embeddings is not None else text_model
        image_encoder = None
        needs_images = any(r.images for r in loaded.records) and not kwargs.get("text_only")
        if embeddings is None and image_model and needs_images:
            image_encoder = ImageEncoder(image_model, image_pretrained, device=device)
        result = select_records(
            loaded.records, k, method, embeddings=embeddings, text_encoder=text_encoder,
            image_encoder=image_encoder, image_root=loaded.image_root,
            cache_path=_cache_prefix(loaded) if cache and embeddings is None else None,
            pool_name=str(pool), **kwargs,
        )
        for key, v in loaded.skipped.items():
            result.skipped[key] = v
            result.summary["pool"]["skipped"][key] = v
        if loaded.notes:
            result.summary.setdefault("notes", [])
            result.summary["notes"] = loaded.notes + result.summary["notes"]
            if kwargs.get("report_dir") is not None:
                from mmtune.fileio import write_json_atomic

                write_json_atomic(result.summary, Path(kwargs["report_dir"]) / "selection.json")
        if rejects is not None:
            with RejectsWriter(rejects) as writer:
                for i, why in result.skip_reasons:
                    writer.add(f"record {loaded.records[i].id!r}: {why}", source=str(pool), index=i,
                               raw=loaded.records[i].to_dict())
        if out is not None:
            out_path = Path(out)
            subset = copy_selected_images(result.records, loaded, out_path)
            write_records(subset, out_path)
            result.records = subset
        return result
    finally:
        loaded.cleanup()


def _cache_prefix(loaded) -> str | None:
    """Embedding cache files go next to the pool: POOL.emb-<hash>.npy."""
    if loaded.kind == "shards":
        src = loaded.path
        if os.path.isdir(src):
            return os.path.join(src, "pool")
        base = os.path.dirname(os.path.abspath(src.split("{")[0])) if "://" not in src else None
        return os.path.join(base, "shards") if base else None
    return os.path.abspath(loaded.path)


def default_out(pool: str, method: str, k: int | None, report: str | None) -> Path:
    if report:
        return Path(report) / "subset.jsonl"
    stem = Path(str(pool).rstrip("/")).name.split("{")[0]
    for suffix in (".jsonl", ".json", ".tar"):
        stem = stem.removesuffix(suffix)
    return Path(f"{stem or 'pool'}.{method}" + (f"-{k}" if k else "") + ".jsonl")
