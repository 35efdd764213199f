"""The selection methods, one function each, in a registry.

A method gets a `MethodInputs` (records, plus embeddings and quality scores
that are computed only when the method asks for them) and returns the chosen
pool indices in selection order with a dict of method-specific facts for the
report. Methods never drop records silently: when they cannot reach k they
raise a `SelectionError` saying how many they found and which flag to change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from mmtune.data.schema import Record
from mmtune.errors import MMTuneError
from mmtune.select.facility import lazy_greedy


class SelectionError(MMTuneError):
    """A selection that cannot be made as asked (one line, naming the knob to turn)."""


@dataclass
class SelectParams:
    """Every knob of every method (each method reads the ones it needs)."""

    k: int | None = None
    alpha: float = 0.5  # qdit: weight of quality against diversity
    diversity_norm: str = "step"  # qdit: how the facility gain is scaled (see facility.py)
    min_quality: float | None = None  # quality: keep records with normalised quality >= this
    max_similarity: float | None = None  # deita (default 0.9) / dedup (default 0.95): cosine threshold
    clusters: int | None = None  # kmeans: number of clusters (default k // 10)
    similarity: str = "auto"  # facility/qdit: dense | knn | auto (dense while N^2 floats fit 1 GB)
    neighbors: int | None = None  # facility/qdit knn: neighbours kept per record (default: see facility.py)
    seed: int = 0


@dataclass
class MethodInputs:
    """What a method may read; embeddings and quality are computed on first access."""

    records: list[Record]
    get_embeddings: Callable[[], np.ndarray]
    get_quality: Callable[[], np.ndarray]  # normalised to [0, 1]
    params: SelectParams
    device: str | None = None
    progress: bool = False

    @cached_property
    def embeddings(self) -> np.ndarray:
        return self.get_embeddings()

    @cached_property
    def quality(self) -> np.ndarray:
        return self.get_quality()

    @property
    def n(self) -> int:
        return len(self.records)


@dataclass
class MethodResult:
    indices: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Method:
    fn: Callable[[MethodInputs], MethodResult]
    help: str
    needs_embeddings: bool
    needs_quality: bool
    needs_k: bool = True
    takes_k: bool = True


METHODS: dict[str, Method] = {}


def register(name: str, help: str, *, embeddings: bool, quality: bool, needs_k: bool = True, takes_k: bool = True):
    def deco(fn: Callable[[MethodInputs], MethodResult]) -> Callable[[MethodInputs], MethodResult]:
        METHODS[name] = Method(fn, help, embeddings, quality, needs_k, takes_k)
        return fn

    return deco


def _k(inp: MethodInputs) -> int:
    k = inp.params.k
    assert k is not None  # checked by the API before any method runs
    return k


# --------------------------------------------------------------------------- #
# Methods
# --------------------------------------------------------------------------- #


@register("random", "k records uniformly at random (seeded)", embeddings=False, quality=False)
def select_random(inp: MethodInputs) -> MethodResult:
    rng = np.random.default_rng(inp.params.seed)
    return MethodResult(rng.permutation(inp.n)[: _k(inp)])


@register("longest", "the k records with the longest responses (Long Is More, Zhao et al. 2024)",
          embeddings=False, quality=False)
def select_longest(inp: MethodInputs) -> MethodResult:
    lengths = np.array([len(r.assistant_text()) for r in inp.records])
    order = np.argsort(-lengths, kind="stable")[: _k(inp)]
    return MethodResult(order, {"min_selected_length_chars": int(lengths[order].min())})


@register("quality", "top-k by quality score, or every record at or above --min-quality (AlpaGasus-style)",
          embeddings=False, quality=True, needs_k=False)
def select_quality(inp: MethodInputs) -> MethodResult:
    q = inp.quality
    order = np.argsort(-q, kind="stable")
    info: dict[str, Any] = {}
    thr = inp.params.min_quality
    if thr is not None:
        passing = int((q >= thr).sum())
        info["passing_min_quality"] = passing
        order = order[:passing]
        k = inp.params.k
        if k is not None and passing < k:
            raise SelectionError(
                f"only {passing} record(s) have normalised quality >= {thr} but k={k}; lower --min-quality or --k"
            )
        if passing == 0:
            raise SelectionError(f"no record has normalised quality >= {thr}; lower --min-quality")
    if inp.params.k is not None:
        order = order[: inp.params.k]
    elif thr is None:
        raise SelectionError("method quality needs --k or --min-quality")
    return MethodResult(order, info)


@register("kmeans", "k-means on the embeddings, an even share per cluster, nearest to the centroid first",
          embeddings=True, quality=False)
def select_kmeans(inp: MethodInputs) -> MethodResult:
    k = _k(inp)
    X = inp.embeddings
    n_clusters = inp.params.clusters or max(1, k // 10)
    n_clusters = min(n_clusters, inp.n, k)
    labels, dist = kmeans_assign(X, n_clusters, seed=inp.params.seed)
    members = [np.flatnonzero(labels == c) for c in range(n_clusters)]
    members = [m[np.argsort(dist[m], kind="stable")] for m in members]  # nearest to centroid first
    quota = _even_shares([len(m) for m in members], k)
    # round-robin by rank, so any prefix of the selection is spread over the clusters
    order = [int(members[c][r]) for r in range(max(quota, default=0)) for c in range(n_clusters) if r < quota[c]]
    coverage = [{"cluster": c, "pool": len(members[c]), "selected": int(quota[c])} for c in range(n_clusters)]
    return MethodResult(np.asarray(order, dtype=np.int64), {"clusters": n_clusters, "cluster_coverage": coverage,
                                                              "labels": labels})


@register("facility", "greedy facility location on cosine similarity (lazy; scales to 1M records)",
          embeddings=True, quality=False)
def select_facility(inp: MethodInputs) -> MethodResult:
    p = inp.params
    res = lazy_greedy(inp.embeddings, _k(inp), similarity=p.similarity, neighbors=p.neighbors, seed=p.seed,
                      device=inp.device, progress=inp.progress)
    return MethodResult(res.indices, _greedy_info(res))


@register("qdit", "QDIT: greedy on (1-alpha) * facility gain + alpha * quality (Bukharin & Zhao)",
          embeddings=True, quality=True)
def select_qdit(inp: MethodInputs) -> MethodResult:
    p = inp.params
    res = lazy_greedy(inp.embeddings, _k(inp), quality=inp.quality, alpha=p.alpha, diversity_norm=p.diversity_norm,
                      similarity=p.similarity, neighbors=p.neighbors, seed=p.seed, device=inp.device,
                      progress=inp.progress)
    info = _greedy_info(res)
    info["quality_sum"] = float(inp.quality[res.indices].sum())
    return MethodResult(res.indices, info)


@register("deita", "by descending quality, keep a record only if its max cosine to those kept is < --max-similarity",
          embeddings=True, quality=True)
def select_deita(inp: MethodInputs) -> MethodResult:
    k = _k(inp)
    thr = 0.9 if inp.params.max_similarity is None else inp.params.max_similarity
    order = np.argsort(-inp.quality, kind="stable")
    kept, seen = deita_filter(inp.embeddings, order, thr, k)
    if len(kept) < k:
        raise SelectionError(
            f"deita: only {len(kept)} record(s) are less than {thr} cosine-similar to each other but k={k}; "
            "raise --max-similarity or lower --k"
        )
    return MethodResult(np.asarray(kept, dtype=np.int64), {"max_similarity": thr, "records_walked": seen})


@register("dedup", "drop exact and near duplicates (cosine >= --max-similarity); keeps the best-quality copy",
          embeddings=True, quality=True, needs_k=False, takes_k=False)
def select_dedup(inp: MethodInputs) -> MethodResult:
    thr = 0.95 if inp.params.max_similarity is None else inp.params.max_similarity
    keep, info = dedup(inp.records, inp.embeddings, inp.quality, thr)
    return MethodResult(keep, info)


# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #


def _greedy_info(res) -> dict[str, Any]:
    return {"lazy_evaluations": res.evaluations, **res.stats}


def _even_shares(sizes: list[int], k: int) -> list[int]:
    """k split as evenly as the cluster sizes allow (what a small cluster cannot take goes to the others)."""
    quota = [0] * len(sizes)
    left = k
    open_ = [c for c, s in enumerate(sizes) if s > 0]
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        # the remainder goes to the biggest clusters first (ties: lower index)
        ranked = sorted(open_, key=lambda c: (-(sizes[c] - quota[c]), c))
        for rank, c in enumerate(ranked):
            give = min(share + (1 if rank < extra else 0), sizes[c] - quota[c])
            quota[c] += give
            left -= give
        open_ = [c for c in open_ if quota[c] < sizes[c]]
    return quota


@contextmanager
def faiss_threads(work: float):
    """One OpenMP thread for small faiss jobs: on a busy CPU, thread start-up and spinning cost
    far more than the work itself (0.3 s instead of 0.2 ms for a 40-point k-means)."""
    import faiss

    before = faiss.omp_get_max_threads()
    if work < 5e7:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def kmeans_assign(X: np.ndarray, n_clusters: int, *, seed: int = 0, niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (faiss) labels and each point's squared distance to its centroid."""
    import faiss

    X = np.ascontiguousarray(X, dtype=np.float32)
    if n_clusters <= 1:
        centroid = X.mean(axis=0, keepdims=True)
        return np.zeros(len(X), dtype=np.int64), ((X - centroid) ** 2).sum(axis=1)
    from sklearn.cluster import kmeans_plusplus

    # k-means++ seeding (scikit-learn, on a sample) then Lloyd iterations (faiss, fast at 1M rows):
    # faiss alone seeds at random and can merge two well-separated clusters.
    rng = np.random.default_rng(seed)
    sample = X if len(X) <= 50 * n_clusters else X[rng.choice(len(X), size=50 * n_clusters, replace=False)]
    init, _ = kmeans_plusplus(sample, n_clusters, random_state=seed)
    with faiss_threads(float(X.shape[0]) * X.shape[1] * n_clusters * niter):
        km = faiss.Kmeans(X.shape[1], n_clusters, niter=niter, seed=seed, spherical=True, verbose=False)
        km.cp.min_points_per_centroid = 1  # small pools are fine; silence faiss's warning
        km.train(X, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
        dist, labels = km.index.search(X, 1)
    return labels[:, 0].astype(np.int64), dist[:, 0]


def deita_filter(X: np.ndarray, order: np.ndarray, threshold: float, k: int | None,
                 chunk: int = 1024) -> tuple[list[int], int]:
    """Walk `order`; keep a row if its max cosine to the rows kept so far is < threshold.

    Chunked: a chunk is compared to everything kept before it in one matrix
    product, then to the rows kept inside the chunk one by one.
    """
    kept: list[int] = []
    kept_vecs = np.zeros((0, X.shape[1]), dtype=np.float32)
    seen = 0
    for lo in range(0, len(order), chunk):
        idx = order[lo : lo + chunk]
        V = X[idx]
        prior = (V @ kept_vecs.T).max(axis=1) if len(kept) else np.full(len(idx), -np.inf)
        new_rows: list[int] = []
        for j, i in enumerate(idx):
            seen += 1
            if prior[j] >= threshold:
                continue
            if new_rows and float((X[new_rows] @ V[j]).max()) >= threshold:
                continue
            new_rows.append(int(i))
            kept.append(int(i))
            if k is not None and len(kept) >= k:
                return kept, seen
        if new_rows:
            kept_vecs = np.concatenate([kept_vecs, X[new_rows]])
    return kept, seen


def _content_hash(rec: Record) -> str:
    text = "\x1e".join(f"{m['role']}\x1f{' '.join(m['content'].split()).lower()}" for m in rec.messages)
    return hashlib.blake2b((text + "\x1d" + "\x1f".join(rec.images)).encode("utf-8"), digest_size=16).hexdigest()


def near_duplicate_pairs(X: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """CSR (lims, neighbours) of pairs with cosine >= threshold (faiss range search).

    Exact (flat inner product) up to 50k rows; an IVF index (nprobe 16) above
    that, which may miss a few pairs that straddle cluster borders.
    """
    import faiss

    X = np.ascontiguousarray(X, dtype=np.float32)
    n, d = X.shape
    if n <= 50_000:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(n))
        quant = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        index.train(X[rng.choice(n, size=min(n, nlist * 64), replace=False)])
        index.nprobe = 16
    with faiss_threads(float(n) * n * d):
        index.add(X)
        lims, _, nbrs = index.range_search(X, float(threshold))
    return lims, nbrs


def dedup(records: list[Record], X: np.ndarray, quality: np.ndarray,
          threshold: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Indices (pool order) that survive exact and near-duplicate removal.

    Records are visited by descending quality so each duplicate group keeps
    its best member; a record is dropped if its content equals a kept one's
    (whitespace- and case-insensitive) or its cosine to a kept one is >= threshold.
    """
    if not 0.0 < threshold <= 1.0:
        raise SelectionError(f"dedup similarity threshold must be in (0, 1], got {threshold}")
    lims, nbrs = near_duplicate_pairs(X, threshold)
    kept = np.zeros(len(records), dtype=bool)
    seen_hash: set[str] = set()
    exact = near = 0
    for i in np.argsort(-quality, kind="stable"):
        h = _content_hash(records[i])
        if h in seen_hash:
            exact += 1
            continue
        neighbours = nbrs[lims[i] : lims[i + 1]]
        if kept[neighbours].any():
            near += 1
            continue
        seen_hash.add(h)
        kept[i] = True
    keep = np.flatnonzero(kept)
    return keep, {"max_similarity": threshold, "exact_duplicates": exact, "near_duplicates": near,
                  "kept": int(keep.size)}
