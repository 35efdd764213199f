"""Greedy facility location (and QDIT) over cosine similarities, from a thousand records to a million.

The facility-location objective of a subset A of a pool X (unit-norm rows) is

    F(A) = sum over pool records i of  max over a in A of  max(0, cos(x_i, x_a))

i.e. how well every pool record is "covered" by its most similar selected
record. F is monotone submodular, so greedy selection is within 1 - 1/e of
optimal, and lazy greedy (re-evaluating a candidate only when its stale upper
bound could still win) returns exactly the greedy answer.

Done naively, every greedy step recomputes every candidate's gain against the
whole pool. Here the similarities live in a `SimilarityGraph`:

* `dense` (small pools, N^2 floats within `dense_bytes`, 1 GB by default, so
  N <= ~16k): the exact clipped-cosine matrix from one blocked matrix product.
* `knn` (larger pools): for every pool record, its `neighbors` most similar
  records (itself included), as a sparse matrix; records outside that list
  count as covering it with similarity 0. The lists come from exact blocked
  top-k matrix products up to `exact_knn_max` records (30k) and from a faiss
  IVF index above that. No N x N matrix is ever held. Gains are then sparse
  sums, so a lazy re-evaluation costs O(reverse degree), not O(N * d).

The sparse objective is what the greedy maximises; the objective that is
reported (`facility_objective`) is always the exact F over the whole pool,
computed in blocks from the embeddings. How close the sparse greedy gets to
exact lazy greedy on the dense matrix is measured by `scripts/bench_select.py`
(>= 0.99 of the exact objective at N = 20k with the default neighbours).

Why hand-written rather than apricot: apricot's facility location needs the
dense N x N matrix (4 TB at N = 1M) or a sparse matrix it builds itself by
brute force; it has no QDIT term, no per-step normalisation and no faiss
neighbour search. The benchmark runs it side by side at N = 20k.

QDIT (Bukharin & Zhao) picks, at each step, argmax over candidates a of

    (1 - alpha) * d(a | A) + alpha * q(a)

with q the quality normalised to [0, 1]. d is the facility gain, rescaled
(`diversity_norm`): "step" divides it by the best gain available at that step,
so the most diverse candidate has d = 1 and alpha is a scale-free trade-off
all the way to the k-th pick; "pool" divides it by N (mean coverage gain),
which is the literal normalised objective but lets quality dominate after a
few picks, because gains shrink as A grows. With alpha = 0 both are plain
facility location. Lazy evaluation stays exact under both, because q is fixed
and every stale gain is an upper bound (submodularity).
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from mmtune.errors import MMTuneError

DIVERSITY_NORMS = ("step", "pool")
SIMILARITIES = ("auto", "dense", "knn")


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _block_rows(n_cols: int, budget_bytes: int = 64 << 20) -> int:
    return int(max(16, min(8192, budget_bytes // max(1, 4 * n_cols))))


def _bar(enabled: bool, **kwargs):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(**kwargs, leave=False)


def default_neighbors(n: int, k: int | None) -> int:
    """Neighbours kept per record: enough that the subset's coverage stays visible.

    With N/k records per pick, each pick covers ~N/k records; keeping about a
    quarter of that (at least 64) reached >= 0.99 of exact greedy in the
    benchmark from N/k = 20 to N/k = 1000.
    """
    per_pick = n / max(1, k or 1)
    return int(min(n, max(64, math.ceil(per_pick / 4))))


# --------------------------------------------------------------------------- #
# The similarity structure
# --------------------------------------------------------------------------- #


@dataclass
class SimilarityGraph:
    """Clipped cosine similarities between pool records: dense or k-nearest-neighbour sparse.

    For the greedy, row i is record i as a *target* (to be covered) and
    column j is record j as a *candidate*; `cols` holds, per candidate, the
    targets it can cover and with what similarity.
    """

    kind: str  # "dense" | "knn"
    n: int
    dense: np.ndarray | None = None  # N x N float32 (symmetric)
    cols: sp.csc_matrix | None = None  # N x N sparse, column j = what candidate j covers
    neighbors: int | None = None
    knn_method: str | None = None  # "exact" | "ivf"
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)  # seconds per build phase

    def first_gains(self) -> np.ndarray:
        if self.dense is not None:
            return self.dense.sum(axis=1, dtype=np.float64)
        assert self.cols is not None
        return np.asarray(self.cols.sum(axis=0, dtype=np.float64)).ravel()

    def gains(self, cands: np.ndarray, cur: np.ndarray) -> np.ndarray:
        """Exact marginal gains of `cands` given each target's current coverage `cur`."""
        if self.dense is not None:
            return np.maximum(self.dense[cands] - cur, 0.0).sum(axis=1, dtype=np.float64)
        c = self.cols
        assert c is not None
        starts, ends = c.indptr[cands], c.indptr[cands + 1]
        sizes = ends - starts
        out = np.zeros(len(cands), dtype=np.float64)
        if sizes.sum() == 0:
            return out
        # gather every candidate's column at once: positions start..end-1 for each
        pos = np.repeat(starts - np.r_[0, np.cumsum(sizes)[:-1]], sizes) + np.arange(sizes.sum())
        contrib = np.maximum(c.data[pos] - cur[c.indices[pos]], 0.0)
        nonempty = sizes > 0
        out[nonempty] = np.add.reduceat(contrib, np.r_[0, np.cumsum(sizes)[:-1]][nonempty], dtype=np.float64)
        return out

    def cover(self, j: int, cur: np.ndarray) -> None:
        """Update `cur` in place after candidate j is selected."""
        if self.dense is not None:
            np.maximum(cur, self.dense[j], out=cur)
            return
        c = self.cols
        assert c is not None
        rows = c.indices[c.indptr[j] : c.indptr[j + 1]]
        np.maximum.at(cur, rows, c.data[c.indptr[j] : c.indptr[j + 1]])

    def describe(self) -> dict:
        out = {"similarity": self.kind, "build_seconds": round(self.seconds, 3),
               **{(k if k == "ivf_nprobe" else f"{k}_seconds"): round(v, 3) for k, v in self.phases.items()}}
        if self.kind == "knn":
            out.update(neighbors=self.neighbors, knn_method=self.knn_method,
                       stored_pairs=int(self.cols.nnz) if self.cols is not None else 0)
        return out


def build_similarity(
    X: np.ndarray,
    *,
    k: int | None = None,
    similarity: str = "auto",
    neighbors: int | None = None,
    dense_bytes: int = 1 << 30,
    exact_knn_max: int = 30_000,
    nprobe: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> SimilarityGraph:
    """The similarity structure for greedy facility location over the rows of X (unit-norm)."""
    t0 = time.perf_counter()
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = X.shape[0]
    if similarity not in SIMILARITIES:
        raise MMTuneError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    if similarity == "auto":
        similarity = "dense" if n * n * 4 <= dense_bytes else "knn"
    if similarity == "dense":
        graph = SimilarityGraph("dense", n, dense=_dense_sims(X, device))
    else:
        m = int(min(n, neighbors or default_neighbors(n, k)))
        if m < 1:
            raise MMTuneError(f"neighbors must be at least 1, got {neighbors}")
        phases: dict[str, float] = {}
        if n <= exact_knn_max:
            sims, idx = _exact_knn(X, m, device, progress)
            method = "exact"
        else:
            sims, idx = _ivf_knn(X, m, nprobe=nprobe, seed=seed, progress=progress, device=device, phases=phases)
            method = "ivf"
        t1 = time.perf_counter()
        cols = _to_columns(sims, idx)
        del sims, idx
        phases["sparse_matrix"] = time.perf_counter() - t1
        graph = SimilarityGraph("knn", n, cols=cols, neighbors=m, knn_method=method, phases=phases)
    graph.seconds = time.perf_counter() - t0
    return graph


def _dense_sims(X: np.ndarray, device) -> np.ndarray:
    dev = _device(device)
    Xt = torch.from_numpy(X).to(dev)
    out = np.empty((len(X), len(X)), dtype=np.float32)
    step = _block_rows(len(X))
    with torch.no_grad():
        for lo in range(0, len(X), step):
            out[lo : lo + step] = (Xt[lo : lo + step] @ Xt.T).clamp_(min=0).cpu().numpy()
    return out


def _exact_knn(X: np.ndarray, m: int, device, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-m neighbours of every row by blocked matrix products (exact)."""
    dev = _device(device)
    Xt = torch.from_numpy(X).to(dev)
    n = len(X)
    sims = np.empty((n, m), dtype=np.float32)
    idx = np.empty((n, m), dtype=np.int32)
    step = _block_rows(n)
    bar = _bar(progress, total=n, desc="facility: neighbours", unit="rec")
    with torch.no_grad():
        for lo in range(0, n, step):
            v, i = torch.topk(Xt[lo : lo + step] @ Xt.T, m, dim=1)
            sims[lo : lo + step] = v.cpu().numpy()
            idx[lo : lo + step] = i.cpu().numpy()
            if bar is not None:
                bar.update(min(step, n - lo))
    if bar is not None:
        bar.close()
    return sims, idx


def _ivf_knn(
    X: np.ndarray, m: int, *, nprobe: int | None, seed: int, progress: bool, device=None,
    phases: dict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-m neighbours of every row: an inverted-file (IVF) search done cell by cell.

    faiss trains the coarse quantizer (spherical k-means, ~sqrt(N) cells)
    and assigns every row to its cell. Then, instead of faiss's per-query
    search (~8 GFLOP/s here), all rows of a cell are searched at once against
    the rows of the `nprobe` cells nearest to that cell's centroid with one
    matrix product and a top-k, at BLAS speed (~10x faster for this all-pairs
    self-join). The probed cells are chosen per cell, not per row, so a row far
    from its centroid can miss neighbours: on well-clustered embeddings (like
    MiniLM's on Alpaca) recall is ~1, on barely clustered ones it drops (the
    benchmark's --noise case).
    """
    import faiss

    phases = {} if phases is None else phases
    t0 = time.perf_counter()
    n, d = X.shape
    nlist = int(min(max(16, round(math.sqrt(n))), n // 16))
    if nprobe is None:  # scan about 20 candidates per neighbour kept (>= 0.99 of exact greedy in the benchmark)
        nprobe = max(4, math.ceil(20 * m / (n / nlist)))
    nprobe = int(min(max(1, nprobe), nlist))
    phases["ivf_nprobe"] = nprobe
    rng = np.random.default_rng(seed)
    km = faiss.Kmeans(d, nlist, niter=10, seed=seed, spherical=True, verbose=False)
    km.cp.min_points_per_centroid = 1
    km.train(X[np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))])
    phases["ivf_train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, assign = km.index.search(X, 1)
    assign = assign[:, 0]
    cents = km.centroids / np.linalg.norm(km.centroids, axis=1, keepdims=True).clip(min=1e-12)
    probes = np.argsort(-(cents @ cents.T), axis=1)[:, :nprobe]  # each cell's nearest cells, itself first
    order = np.argsort(assign, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(assign, minlength=nlist))]
    members = [order[bounds[c] : bounds[c + 1]] for c in range(nlist)]
    phases["ivf_assign"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    dev = _device(device)
    Xt = torch.from_numpy(X)
    sims = np.zeros((n, m), dtype=np.float32)
    idx = np.full((n, m), -1, dtype=np.int32)
    bar = _bar(progress, total=n, desc="facility: neighbours (IVF)", unit="rec")
    with torch.no_grad():
        for c in range(nlist):
            q = members[c]
            if len(q) == 0:
                continue
            cand = np.concatenate([members[p] for p in probes[c]])
            Q = Xt.index_select(0, torch.from_numpy(q)).to(dev)
            C = Xt.index_select(0, torch.from_numpy(cand)).to(dev)
            top = min(m, len(cand))
            v, i = torch.topk(Q @ C.T, top, dim=1)
            sims[q, :top] = v.cpu().numpy()
            idx[q, :top] = cand[i.cpu().numpy()]
            if bar is not None:
                bar.update(len(q))
    if bar is not None:
        bar.close()
    phases["ivf_search"] = time.perf_counter() - t0
    return sims, idx


def _to_columns(sims: np.ndarray, idx: np.ndarray) -> sp.csc_matrix:
    """Neighbour lists (row i: its neighbours) -> sparse matrix by candidate column, clipped at 0.

    Built as CSR straight from the lists, then converted by scipy (a linear-time
    counting sort), so memory stays a few copies of the N x m lists.
    """
    n = sims.shape[0]
    keep = (idx >= 0) & (sims > 0)  # short lists are padded with -1; clipped cosine drops negatives
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    indices = idx[keep].astype(np.int32, copy=False)
    data = np.minimum(sims[keep], 1.0)
    del keep
    csr = sp.csr_matrix((data, indices, indptr), shape=(n, n))
    del data, indices
    return csr.tocsc()


# --------------------------------------------------------------------------- #
# Objective
# --------------------------------------------------------------------------- #


def facility_objective(
    X: np.ndarray, selected: np.ndarray | list[int], *, device: str | torch.device | None = None
) -> float:
    """Exact F(selected) over the whole pool: sum_i max_j max(0, x_i . x_j).

    Rows of X must be unit-norm. Blocked over the pool, so memory is
    O(block x k); cost N * k * d.
    """
    sel = np.asarray(selected, dtype=np.int64)
    if sel.size == 0:
        return 0.0
    dev = _device(device)
    Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    S = Xt.index_select(0, torch.from_numpy(sel)).to(dev)
    total = 0.0
    step = _block_rows(len(sel))
    with torch.no_grad():
        for lo in range(0, Xt.shape[0], step):
            blk = Xt[lo : lo + step].to(dev)
            total += float((blk @ S.T).clamp_(min=0).amax(dim=1).sum(dtype=torch.float64))
    return total


# --------------------------------------------------------------------------- #
# Lazy greedy
# --------------------------------------------------------------------------- #


@dataclass
class GreedyResult:
    """What a greedy run chose and what it cost."""

    indices: np.ndarray  # pool indices in selection order
    gains: np.ndarray  # the (sparse) facility gain of each pick
    evaluations: int  # exact gain re-evaluations done lazily
    seconds: float  # the whole run, similarity structure included
    stats: dict = field(default_factory=dict)


def lazy_greedy(
    X: np.ndarray | None,
    k: int,
    *,
    graph: SimilarityGraph | None = None,
    quality: np.ndarray | None = None,
    alpha: float = 0.0,
    diversity_norm: str = "step",
    similarity: str = "auto",
    neighbors: int | None = None,
    seed: int = 0,
    batch: int = 16,
    device: str | torch.device | None = None,
    progress: bool = False,
    **graph_kwargs,
) -> GreedyResult:
    """Pick k pool records by (QDIT-weighted) lazy greedy facility location.

    Give the unit-norm embeddings X (the similarity graph is built here, see
    `build_similarity`), or a prebuilt `graph`. `quality` (length N, in [0, 1])
    with `alpha` > 0 gives QDIT; alpha = 0 is plain facility location.
    Deterministic: ties go to the lower index.
    """
    t0 = time.perf_counter()
    n = graph.n if graph is not None else (0 if X is None else X.shape[0])
    if not 0 < k <= n:
        raise MMTuneError(f"k must be between 1 and the pool size {n}, got {k}")
    if not 0.0 <= alpha <= 1.0:
        raise MMTuneError(f"alpha must be in [0, 1], got {alpha}")
    if diversity_norm not in DIVERSITY_NORMS:
        raise MMTuneError(f"diversity_norm must be one of {', '.join(DIVERSITY_NORMS)}, got {diversity_norm!r}")
    if alpha > 0 and quality is None:
        raise MMTuneError("alpha > 0 needs a quality score per record")
    use_q = quality is not None and alpha > 0
    q = np.asarray(quality, dtype=np.float64) if use_q else np.zeros(n)
    if q.shape != (n,):
        raise MMTuneError(f"quality has {q.shape[0]} values but the pool has {n} records")
    if graph is None:
        assert X is not None
        graph = build_similarity(X, k=k, similarity=similarity, neighbors=neighbors, seed=seed, device=device,
                                 progress=progress, **graph_kwargs)

    ub = graph.first_gains()  # every candidate's gain upper bound (exact when fresh)
    heaps = _BucketHeaps(ub, q if use_q else None)
    fresh = np.full(n, -1, dtype=np.int64)  # the step at which a candidate's bound was last made exact
    cur = np.zeros(n, dtype=np.float32)  # coverage of each pool record so far
    evaluations = 0

    def evaluate(cands: list[int], step: int) -> None:
        nonlocal evaluations
        c = np.asarray(cands, dtype=np.int64)
        ub[c] = graph.gains(c, cur)
        fresh[c] = step
        evaluations += len(c)

    picks: list[int] = []
    gains: list[float] = []
    bar = _bar(progress, total=k, desc="facility: greedy", unit="pick")
    for step in range(k):
        if use_q:
            if diversity_norm == "step":
                best = heaps.argmax(1.0, 0.0, ub, q, fresh, step, evaluate, batch)
                d_scale = float(ub[best])
            else:
                d_scale = float(n)
            c1 = (1.0 - alpha) / d_scale if d_scale > 1e-12 else 0.0  # nothing left to cover: quality decides
            j = heaps.argmax(c1, alpha, ub, q, fresh, step, evaluate, batch)
        else:
            j = heaps.argmax(1.0, 0.0, ub, q, fresh, step, evaluate, batch)
        gains.append(float(ub[j]))
        graph.cover(j, cur)
        picks.append(j)
        heaps.finish_step(j, ub)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    return GreedyResult(
        indices=np.asarray(picks, dtype=np.int64),
        gains=np.asarray(gains, dtype=np.float64),
        evaluations=evaluations,
        seconds=seconds,
        stats={**graph.describe(), "greedy_seconds": round(seconds - graph.seconds, 3),
               "sparse_objective": float(cur.sum(dtype=np.float64))},
    )


class _BucketHeaps:
    """Max-heaps of candidates by gain bound, one per quality bucket, for exact lazy greedy on

        key(a) = c1 * gain(a) + c2 * q(a)

    where c1, c2 may change every step (QDIT's per-step normalisation). Within
    a bucket q lies in [q_lo, q_hi], so c1 * (top bound) + c2 * q_hi bounds
    every key in it; the search pops the bucket with the highest bound,
    re-evaluates stale candidates in batches, and stops when the best exact
    key beats every bucket's bound. Popped candidates wait in `aside` (their
    bounds are exact this step) and go back when the step ends.
    Hand-written because heapq has no "many heaps, changing key weights" form.
    """

    def __init__(self, ub: np.ndarray, q: np.ndarray | None, n_buckets: int = 64) -> None:
        n = len(ub)
        if q is None:
            groups = [np.arange(n)]
            self.q_hi = np.zeros(1)
        else:
            order = np.argsort(q, kind="stable")
            groups = [g for g in np.array_split(order, min(n_buckets, n)) if len(g)]
            self.q_hi = np.array([q[g].max() for g in groups])
        self.bucket_of = np.empty(n, dtype=np.int64)
        self.heaps: list[list[tuple[float, int]]] = []
        for b, g in enumerate(groups):
            self.bucket_of[g] = b
            h = list(zip((-ub[g]).tolist(), g.tolist(), strict=True))
            heapq.heapify(h)
            self.heaps.append(h)
        self.aside: list[int] = []

    def argmax(self, c1, c2, ub, q, fresh, step, evaluate, batch) -> int:
        best, best_key = -1, float("-inf")
        for i in self.aside:  # already exact this step
            key = c1 * ub[i] + c2 * q[i]
            if key > best_key or (key == best_key and i < best):
                best, best_key = i, key
        heaps, q_hi = self.heaps, self.q_hi
        while True:
            top_b, top_v = -1, float("-inf")
            for b, h in enumerate(heaps):
                if h:
                    v = c1 * -h[0][0] + c2 * q_hi[b]
                    if v > top_v:
                        top_b, top_v = b, v
            if top_b < 0 or (best >= 0 and top_v <= best_key):
                return best
            h, bound_q = heaps[top_b], c2 * q_hi[top_b]
            stale: list[int] = []
            while h and len(stale) < batch and (best < 0 or c1 * -h[0][0] + bound_q > best_key):
                i = heapq.heappop(h)[1]
                self.aside.append(i)
                if fresh[i] == step:
                    key = c1 * ub[i] + c2 * q[i]
                    if key > best_key or (key == best_key and i < best):
                        best, best_key = i, key
                else:
                    stale.append(i)
            if stale:
                evaluate(stale, step)
                for i in stale:
                    key = c1 * ub[i] + c2 * q[i]
                    if key > best_key or (key == best_key and i < best):
                        best, best_key = i, key

    def finish_step(self, chosen: int, ub: np.ndarray) -> None:
        for i in self.aside:
            if i != chosen:
                heapq.heappush(self.heaps[self.bucket_of[i]], (-ub[i], i))
        self.aside = []
