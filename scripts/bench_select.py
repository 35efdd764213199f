"""Speed, memory and quality of greedy facility location (`mmtune select --method facility`).

For each pool size N (default 20k, 100k, 1M; d = 384, k = 1,000) a fresh
subprocess generates N unit embeddings, runs `mmtune.select.facility.lazy_greedy`
with the defaults `mmtune select` uses (embeddings given, so no encoder runs),
and reports wall time, the process's peak resident memory (embeddings
included) and the exact facility-location objective of the subset (sum over the
pool of the max clipped cosine similarity to the subset).

At N = 20k it also runs, on the same embeddings:
  * exact lazy greedy on the dense clipped-cosine matrix (the quality reference),
  * apricot-select's FacilityLocationSelection (lazy, metric="precomputed") on
    that same matrix: time ratio and objective ratio,
  * the faiss-IVF neighbour path forced at 20k (what 100k and 1M use),
  * k = 20 (N/k = 1,000, the ratio of the 1M run) against exact greedy.

The embeddings are synthetic and seeded: a Zipf mixture of 100 topics x 20
subtopics on the unit sphere around a shared direction, so that cosine
similarities look like a sentence encoder's (unrelated ~0.1, same topic ~0.35,
same subtopic ~0.65). `--embeddings FILE.npy` uses real ones instead (rows are
sampled or tiled to each N).

    python scripts/bench_select.py                       # 20k (+ apricot), 100k, 1M
    python scripts/bench_select.py --sizes 20000,100000  # skip the 1M run (~2-4 min)
    python scripts/bench_select.py --no-apricot
    python scripts/bench_select.py --quick       # timings only, no exact / apricot reference

Targets (issue): 100k under 30 s and 4 GB; 1M under 10 min and 12 GB; at 20k
the objective at least 0.99 of exact lazy greedy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {100_000: (30.0, 4.0), 1_000_000: (600.0, 12.0)}  # N: (seconds, GB)


def synthetic_embeddings(n: int, d: int = 384, topics: int = 100, subtopics: int = 20, seed: int = 0,
                         noise: float = 0.0):
    import numpy as np

    rng = np.random.default_rng(seed)

    def unit(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    shared = unit(rng.standard_normal(d)).astype(np.float32)
    topic = unit(rng.standard_normal((topics, d))).astype(np.float32)
    sub = unit(rng.standard_normal((topics, subtopics, d))).astype(np.float32)
    p = 1.0 / np.arange(1, topics + 1) ** 0.8
    t = rng.choice(topics, size=n, p=p / p.sum())
    s = rng.integers(0, subtopics, size=n)
    X = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, 100_000):  # in chunks: the temporaries stay small
        hi = min(n, lo + 100_000)
        own = unit(rng.standard_normal((hi - lo, d)).astype(np.float32))
        X[lo:hi] = 0.32 * shared + 0.5 * topic[t[lo:hi]] + 0.55 * sub[t[lo:hi], s[lo:hi]] + 0.59 * own
        if noise > 0:  # blur the clusters: a harder case for approximate neighbour search
            X[lo:hi] += noise * rng.standard_normal((hi - lo, d)).astype(np.float32)
        X[lo:hi] /= np.linalg.norm(X[lo:hi], axis=1, keepdims=True)
    return X


def load_embeddings(args, n: int):
    import numpy as np

    if not args.embeddings:
        return synthetic_embeddings(n, args.dim, seed=args.seed, noise=args.noise)
    base = np.load(args.embeddings, mmap_mode="r")
    rows = np.random.default_rng(args.seed).choice(len(base), size=n, replace=n > len(base))
    X = np.asarray(base[np.sort(rows)], dtype=np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


# --------------------------------------------------------------------------- #
# Worker: one pool size, in its own process (so peak memory is its own)
# --------------------------------------------------------------------------- #


def worker(args) -> dict:
    import numpy as np

    from mmtune.select.facility import facility_objective, lazy_greedy

    n, k = args.worker, args.k
    X = load_embeddings(args, n)
    t0 = time.perf_counter()
    res = lazy_greedy(X, k, seed=args.seed)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    objective = facility_objective(X, res.indices)
    out = {"n": n, "k": k, "d": X.shape[1], "seconds": wall, "objective": objective,
           "objective_seconds": time.perf_counter() - t1, "stats": res.stats, "evaluations": res.evaluations}
    rng = np.random.default_rng(args.seed)
    out["random_objective"] = facility_objective(X, rng.choice(n, k, replace=False))
    if args.with_quality:  # a separate process from the timed one, so its memory is not counted there
        out["quality"] = quality_checks(X, k, res, objective, args)
    return out


def quality_checks(X, k: int, res, objective: float, args) -> dict:
    import numpy as np

    from mmtune.select.facility import build_similarity, facility_objective, lazy_greedy

    q: dict = {}
    t0 = time.perf_counter()
    exact = lazy_greedy(X, k, similarity="dense", dense_bytes=4 << 30)
    q["exact_seconds"] = time.perf_counter() - t0
    exact_obj = facility_objective(X, exact.indices)
    q["exact_objective"] = exact_obj
    q["ratio_default"] = objective / exact_obj
    q["ratio_random"] = facility_objective(X, np.random.default_rng(args.seed).choice(len(X), k, replace=False)) / exact_obj

    t0 = time.perf_counter()
    ivf = lazy_greedy(X, k, exact_knn_max=0)  # the faiss-IVF neighbour path used above 30k
    q["ivf_seconds"] = time.perf_counter() - t0
    q["ratio_ivf"] = facility_objective(X, ivf.indices) / exact_obj

    small_k = max(1, len(X) // 1000)  # N/k = 1000, as in the 1M run
    ex_small = lazy_greedy(None, small_k, graph=exact_graph(X, build_similarity))
    kn_small = lazy_greedy(X, small_k, exact_knn_max=0)
    q["small_k"] = small_k
    q["ratio_small_k_ivf"] = facility_objective(X, kn_small.indices) / facility_objective(X, ex_small.indices)

    if not args.no_apricot:
        q["apricot"] = apricot_check(X, k, objective, res.seconds, exact_obj, exact, q["exact_seconds"])
    return q


_GRAPH = {}


def exact_graph(X, build_similarity):
    if "g" not in _GRAPH:
        _GRAPH["g"] = build_similarity(X, similarity="dense", dense_bytes=4 << 30)
    return _GRAPH["g"]


def apricot_check(X, k: int, ours_obj: float, ours_seconds: float, exact_obj: float, exact,
                  exact_seconds: float) -> dict:
    import numpy as np

    from mmtune.select.facility import facility_objective

    try:
        from apricot import FacilityLocationSelection
    except ImportError:
        return {"skipped": "apricot-select is not installed (pip install apricot-select)"}
    S = np.maximum(X @ X.T, 0).astype(np.float32)  # the same clipped-cosine matrix for both
    # warm numba up on a tiny problem so compile time is not counted against apricot
    FacilityLocationSelection(2, metric="precomputed", optimizer="lazy").fit(S[:50, :50])
    t0 = time.perf_counter()
    sel = FacilityLocationSelection(k, metric="precomputed", optimizer="lazy").fit(S)
    ap_seconds = time.perf_counter() - t0
    ap_obj = facility_objective(X, np.asarray(sel.ranking, dtype=np.int64))
    del S
    return {"seconds": ap_seconds, "objective": ap_obj, "ours_seconds": ours_seconds, "ours_exact_seconds": exact_seconds,
            "exact_dense_same_picks": [int(i) for i in sel.ranking[:50]] == exact.indices[:50].tolist(),
            "time_ratio_apricot_over_ours_default": ap_seconds / ours_seconds,
            "time_ratio_apricot_over_ours_exact_dense": ap_seconds / exact_seconds,
            "objective_ratio_ours_default_over_apricot": ours_obj / ap_obj,
            "objective_ratio_ours_exact_over_apricot": exact_obj / ap_obj}


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #


def run_size(n: int, args, with_quality: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(n), "--k", str(args.k), "--dim", str(args.dim),
           "--seed", str(args.seed), "--noise", str(args.noise)] \
        + (["--embeddings", args.embeddings] if args.embeddings else []) \
        + (["--no-apricot"] if args.no_apricot else []) + (["--with-quality"] if with_quality else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"worker for N={n} failed (status {status})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_gb"] = usage.ru_maxrss / 1e6  # Linux reports KiB
    return result


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()} cores ({cpu}){gpu}, torch threads {torch.get_num_threads()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="20000,100000,1000000", help="comma-separated pool sizes")
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=0.0,
                   help="extra isotropic noise per coordinate on the synthetic embeddings (0.08: barely clustered)")
    p.add_argument("--embeddings", help="real embeddings (.npy) to sample each pool from, instead of synthetic ones")
    p.add_argument("--no-apricot", action="store_true", help="skip the apricot comparison at N <= 30k")
    p.add_argument("--quick", action="store_true", help="timings only (no exact / apricot reference)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--with-quality", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.2f} (other processes share the CPU)")
    what = "from " + args.embeddings if args.embeddings else "synthetic clustered" + (
        f", noise {args.noise}" if args.noise else "")
    print(f"embeddings: {what}, d={args.dim}, "
          f"k={args.k}, seed={args.seed}")
    results, failed = [], False
    for n in (int(x) for x in args.sizes.split(",")):
        r = run_size(n, args)
        if n <= 30_000 and not args.quick:
            r["quality"] = run_size(n, args, with_quality=True)["quality"]
        results.append(r)
        st = r["stats"]
        how = st["similarity"] + (f", {st['neighbors']} neighbours ({st['knn_method']})" if st["similarity"] == "knn" else "")
        line = (f"N={n:>9,}: {r['seconds']:7.1f} s, peak {r['peak_gb']:5.2f} GB, {how}; "
                f"graph {st['build_seconds']:.1f} s + greedy {st['greedy_seconds']:.1f} s; "
                f"objective/N {r['objective'] / n:.4f} (random subset {r['random_objective'] / n:.4f})")
        if n in TARGETS:
            secs, gb = TARGETS[n]
            ok = r["seconds"] < secs and r["peak_gb"] < gb
            failed |= not ok
            line += f"  [target < {secs:.0f} s, < {gb:.0f} GB: {'PASS' if ok else 'FAIL'}]"
        print(line, flush=True)
        q = r.get("quality")
        if q:
            ok = q["ratio_default"] >= 0.99
            failed |= not ok
            print(f"  quality at N={n:,}: default / exact dense lazy greedy = {q['ratio_default']:.4f} "
                  f"[target >= 0.99: {'PASS' if ok else 'FAIL'}]; exact took {q['exact_seconds']:.1f} s")
            print(f"  IVF neighbours forced at N={n:,}: ratio {q['ratio_ivf']:.4f} ({q['ivf_seconds']:.1f} s); "
                  f"k={q['small_k']} (N/k=1000, as at 1M), IVF vs exact: {q['ratio_small_k_ivf']:.4f}; "
                  f"random subset: {q['ratio_random']:.4f}")
            ap = q.get("apricot")
            if ap and "skipped" not in ap:
                print(f"  apricot FacilityLocationSelection (lazy, precomputed clipped cosine, same N, k): "
                      f"{ap['seconds']:.1f} s vs ours {ap['ours_seconds']:.1f} s in the same process: apricot time / ours = "
                      f"{ap['time_ratio_apricot_over_ours_default']:.1f}x (vs our exact dense greedy, "
                      f"{ap['ours_exact_seconds']:.1f} s: {ap['time_ratio_apricot_over_ours_exact_dense']:.1f}x); "
                      f"objective ours / apricot = {ap['objective_ratio_ours_default_over_apricot']:.4f} "
                      f"(our exact dense greedy / apricot = {ap['objective_ratio_ours_exact_over_apricot']:.4f}, "
                      f"same first 50 picks: {ap['exact_dense_same_picks']})")
            elif ap:
                print(f"  apricot: {ap['skipped']}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
