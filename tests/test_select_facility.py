"""Greedy facility location / QDIT: the lazy engine equals naive greedy, sampling stays close, apricot agrees."""

import numpy as np
import pytest

from mmtune.errors import MMTuneError
from mmtune.select.algorithms import _even_shares, deita_filter
from mmtune.select.facility import build_similarity, default_neighbors, facility_objective, lazy_greedy


def clustered(n: int, d: int = 24, clusters: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d))
    X = centers[rng.integers(0, clusters, n)] + 0.9 * rng.standard_normal((n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32)


def naive_greedy(X, k, q=None, alpha=0.0, norm="step"):
    """The textbook O(k N^2) greedy, recomputing every gain at every step."""
    S = np.maximum(X.astype(np.float64) @ X.T.astype(np.float64), 0)
    cur = np.zeros(len(X))
    chosen: list[int] = []
    for _ in range(k):
        gain = np.maximum(S - cur[None, :], 0).sum(axis=1)
        gain[chosen] = 0.0
        if q is None or alpha == 0:
            key = gain.copy()
        else:
            scale = gain.max() if norm == "step" else len(X)
            key = (1 - alpha) * (gain / scale if scale > 1e-12 else 0 * gain) + alpha * q
        key[chosen] = -np.inf
        j = int(np.argmax(key))
        chosen.append(j)
        cur = np.maximum(cur, S[j])
    return chosen, float(cur.sum())


def test_lazy_greedy_equals_naive_greedy_exactly():
    X = clustered(600)
    want, value = naive_greedy(X, 30)
    got = lazy_greedy(X, 30)
    assert got.indices.tolist() == want
    assert got.stats["similarity"] == "dense"
    assert facility_objective(X, got.indices) == pytest.approx(value, rel=1e-5)
    assert got.stats["sparse_objective"] == pytest.approx(value, rel=1e-5)
    assert got.gains[0] >= got.gains[-1] > 0  # diminishing returns
    # the sparse structure keeping every neighbour is the same function: same picks
    full = lazy_greedy(X, 30, similarity="knn", neighbors=600)
    assert full.indices.tolist() == want and full.stats["knn_method"] == "exact"


def test_sparse_gains_match_a_dense_truncated_matrix():
    X = clustered(300, seed=9)
    graph = build_similarity(X, similarity="knn", neighbors=20)
    S = np.maximum(X @ X.T, 0)
    thr = -np.sort(-S, axis=1)[:, 19:20]
    T = np.where(S >= thr, S, 0)  # row i keeps its 20 nearest; column j = what j covers
    cur = np.random.default_rng(0).random(300).astype(np.float32) * 0.5
    cands = np.array([0, 5, 299, 17, 5])
    want = np.maximum(T[:, cands] - cur[:, None], 0).sum(axis=0)
    assert np.allclose(graph.gains(cands, cur), want, rtol=1e-5)
    assert np.allclose(graph.first_gains(), T.sum(axis=0), rtol=1e-5)
    before = cur.copy()
    graph.cover(5, cur)
    assert np.allclose(cur, np.maximum(before, T[:, 5]))


@pytest.mark.parametrize("alpha", [0.2, 0.7, 1.0])
@pytest.mark.parametrize("norm", ["step", "pool"])
def test_qdit_equals_naive_greedy(alpha, norm):
    X = clustered(400, seed=1)
    q = np.random.default_rng(2).random(400)
    want, _ = naive_greedy(X, 25, q, alpha, norm)
    got = lazy_greedy(X, 25, quality=q, alpha=alpha, diversity_norm=norm)
    assert got.indices.tolist() == want


def test_alpha_trades_diversity_for_quality():
    X = clustered(500, seed=3)
    q = np.random.default_rng(4).random(500)
    runs = [lazy_greedy(X, 40, quality=q, alpha=a) for a in (0.0, 0.5, 0.9)]
    cover = [facility_objective(X, r.indices) for r in runs]
    qual = [q[r.indices].mean() for r in runs]
    assert cover[0] > cover[1] > cover[2]
    assert qual[0] < qual[1] < qual[2]


def test_knn_greedy_close_to_exact_and_deterministic():
    X = clustered(3000, seed=5)
    exact = facility_objective(X, lazy_greedy(X, 60).indices)
    a = lazy_greedy(X, 60, similarity="knn")
    b = lazy_greedy(X, 60, similarity="knn")
    assert a.stats["neighbors"] == 64 and a.stats["stored_pairs"] <= 3000 * 64
    assert a.indices.tolist() == b.indices.tolist()
    ratio = facility_objective(X, a.indices) / exact
    rand = facility_objective(X, np.random.default_rng(0).choice(3000, 60, replace=False)) / exact
    assert 0.98 <= ratio <= 1.01
    assert rand < 0.95 * ratio  # the test can tell a good selection from a random one


def test_ivf_neighbours_are_used_above_the_exact_limit():
    X = clustered(2000, seed=10)
    graph = build_similarity(X, k=20, similarity="knn", neighbors=16, exact_knn_max=1000)
    exact = build_similarity(X, k=20, similarity="knn", neighbors=16)
    assert graph.knn_method == "ivf" and exact.knn_method == "exact"
    overlap = (graph.cols != 0).multiply(exact.cols != 0).sum() / exact.cols.nnz
    assert overlap > 0.9  # faiss IVF recall on clustered data
    a = lazy_greedy(None, 20, graph=graph)
    b = lazy_greedy(None, 20, graph=exact)
    assert facility_objective(X, a.indices) >= 0.98 * facility_objective(X, b.indices)


def test_facility_objective_matches_brute_force():
    X = clustered(200, seed=6)
    sel = [3, 50, 199]
    brute = np.maximum(X @ X[sel].T, 0).max(axis=1).sum()
    assert facility_objective(X, sel) == pytest.approx(brute, rel=1e-6)
    assert facility_objective(X, []) == 0.0


def test_bad_arguments_are_one_line_errors():
    X = clustered(20)
    with pytest.raises(MMTuneError, match="k must be between 1 and the pool size 20"):
        lazy_greedy(X, 21)
    with pytest.raises(MMTuneError, match="alpha must be in"):
        lazy_greedy(X, 2, quality=np.ones(20), alpha=1.5)
    with pytest.raises(MMTuneError, match="needs a quality"):
        lazy_greedy(X, 2, alpha=0.5)
    with pytest.raises(MMTuneError, match="quality has 3 values"):
        lazy_greedy(X, 2, quality=np.ones(3), alpha=0.5)


@pytest.mark.slow  # numba compiles apricot's kernels on first use (~10-20 s)
def test_apricot_agrees_on_the_same_clipped_cosine_matrix():
    apricot = pytest.importorskip("apricot")
    X = clustered(500, seed=8)
    S = np.maximum(X @ X.T, 0).astype(np.float64)
    theirs = apricot.FacilityLocationSelection(20, metric="precomputed", optimizer="lazy").fit(S).ranking
    ours = lazy_greedy(X, 20).indices
    assert facility_objective(X, ours) >= facility_objective(X, theirs) * (1 - 1e-6)
    assert list(ours[:10]) == [int(i) for i in theirs[:10]]


def test_default_neighbors_scale_with_records_per_pick():
    assert default_neighbors(20_000, 1000) == 64
    assert default_neighbors(1_000_000, 1000) == 250
    assert default_neighbors(50, 10) == 50


def test_even_shares_respects_small_clusters():
    assert _even_shares([10, 10, 10], 9) == [3, 3, 3]
    assert _even_shares([1, 10, 10], 9) == [1, 4, 4]
    assert sum(_even_shares([5, 3, 7, 1], 16)) == 16
    assert _even_shares([2, 2], 3) in ([2, 1], [1, 2])


def test_deita_filter_keeps_only_dissimilar_rows():
    X = np.array([[1, 0], [0.999, 0.0447], [0, 1], [0.7071, 0.7071]], dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    kept, seen = deita_filter(X, np.arange(4), 0.9, None, chunk=2)
    assert kept == [0, 2, 3] and seen == 4
    assert deita_filter(X, np.arange(4), 0.9, 2)[0] == [0, 2]
