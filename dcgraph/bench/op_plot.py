"""The op level's plot: per block, each row's time over the fastest conv alone."""

from __future__ import annotations

from pathlib import Path

from . import harness as H
from .op_rows import FAMILY, GOAL, ROWS


def plot(recs: list[dict], name: str) -> Path | None:
    """Per layer: each row's time / floor, one panel per batch (log scale, goal line at 1.05x)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError:
        return None
    batches = sorted({r["batch"] for r in recs})
    keys = [k for k in ROWS if FAMILY[k] != "floor" and any("vs_floor" in r["rows"].get(k, {}) for r in recs)]
    fig, axes = plt.subplots(len(batches), 1, figsize=(max(8, 0.9 * len(recs) / len(batches) + 4),
                                                       3.6 * len(batches)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, batch in zip(axes[:, 0], batches, strict=True):
        sel = [r for r in recs if r["batch"] == batch]
        width = 0.8 / max(1, len(keys))
        for i, k in enumerate(keys):
            xs, ys = [], []
            for j, r in enumerate(sel):
                v = r["rows"].get(k, {}).get("vs_floor")
                if v:
                    xs.append(j + (i - (len(keys) - 1) / 2) * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=ROWS[k][0], color=cmap(list(ROWS).index(k) % 10),
                   hatch="//" if FAMILY[k] == "dcgraph" else None, edgecolor="white", linewidth=0.3)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(GOAL, color="red", linewidth=0.8, linestyle="--", label=f"goal {GOAL}x")
        ax.set_yscale("log")
        top = max([r["rows"].get(k, {}).get("vs_floor") or 1.0 for r in sel for k in keys] + [1.2])
        ax.set_ylim(0.7, top * 1.15)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks([t for t in (0.8, 1, 1.5, 2, 3, 5, 8, 12, 20) if t <= top * 1.15])
        ax.set_xticks(range(len(sel)), [r["layer"] for r in sel], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("time / fastest conv alone")
        ax.set_title(f"conv + Deep Control + act, batch {batch} (hatched: dcgraph)", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=5, loc="upper center")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    path = H.save_plot(fig, name)
    plt.close(fig)
    return path
