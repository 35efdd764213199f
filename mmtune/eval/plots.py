"""The eval results chart: one panel per model, tasks on the x axis, one bar per mode.

Each bar is labelled with its score and counted/total, tasks that were
unseen in training are marked, a model shows only the modes it ran, and a
result with no counted record is an empty hatched slot ("n/a"), not a zero bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmtune.fileio import write_png

MODE_COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def plot_results(report: dict[str, Any], path: str | Path) -> Path:
    """Write the tasks x modes bar chart (per model) of an eval report as PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: dict[str, dict[str, dict[str, Any]]] = report["results"]
    models = list(results)
    tasks = list(dict.fromkeys(t for per_task in results.values() for t in per_task))
    modes = list(dict.fromkeys(m for per_task in results.values() for per_mode in per_task.values()
                               for m in per_mode))
    unseen = set(report.get("unseen_tasks") or [])
    colours = {m: MODE_COLOURS[i % len(MODE_COLOURS)] for i, m in enumerate(modes)}
    fig_w = max(6.0, 1.1 * len(tasks) * max(1, len(modes)) ** 0.5 + 2.5)
    fig, axes = plt.subplots(len(models), 1, figsize=(fig_w, 3.4 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=True):
        metric_names = set()
        # Only the modes this model ran get a slot (models may run different modes).
        own = [m for m in modes if any(m in per_mode for per_mode in results[model].values())]
        width = min(0.8 / max(1, len(own)), 0.4)
        for j, mode in enumerate(own):
            for i, task in enumerate(tasks):
                e = results[model].get(task, {}).get(mode)
                x = i - width * len(own) / 2 + width * (j + 0.5)
                if e is None:
                    continue
                if e.get("score") is None:  # nothing counted: an empty slot, not a zero
                    ax.bar(x, 10, width, color="none", edgecolor=colours[mode], hatch="//", linewidth=0.8)
                    ax.text(x, 11.5, f"n/a\n0/{e['total']}", ha="center", va="bottom", fontsize=7,
                            linespacing=0.95)
                    continue
                metric_names.add(e["metric"])
                score = 100 * e["score"]
                ax.bar(x, score, width, color=colours[mode])
                whisker = 100 * (e.get("stderr") or 0.0)
                if whisker:  # +- one standard error over the questions; the label goes above it
                    ax.errorbar(x, score, yerr=whisker, fmt="none", ecolor="#333333", elinewidth=0.8, capsize=2)
                ax.text(x, score + whisker + 1.5, f"{score:.1f}\n{e['counted']}/{e['total']}", ha="center", va="bottom",
                        fontsize=7, linespacing=0.95)
        modes_here = own
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels([t + ("\n(unseen)" if t in unseen else "") for t in tasks], fontsize=9)
        ax.set_ylim(0, 130)  # room for a label above a whisker, under the legend
        ax.set_xlim(-0.6, len(tasks) - 0.4)
        ax.set_ylabel("score (%)")
        ax.set_title(f"{model}" + (f"  —  {', '.join(sorted(metric_names))}" if metric_names else ""),
                     fontsize=10, loc="left")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[m]) for m in modes_here]
        ax.legend(handles, modes_here, fontsize=8, loc="upper right", ncol=max(1, len(modes_here)), frameon=False)
    fig.suptitle("mmtune eval: score per task and mode (labels: score, counted/total; whiskers: ± standard error)",
                 fontsize=11)
    fig.tight_layout()
    try:
        return write_png(fig, path, dpi=110)
    finally:
        plt.close(fig)
