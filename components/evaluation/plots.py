"""Figures for evaluation reports (rendered with the Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from components.storage import atomic_write_path

_BINS = 50


def plot_distance_histograms(series: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> None:
    """Write a PNG with one subplot per model: normalised histograms of positive vs negative pair distances.

    `series` maps a model name (e.g. "fine-tuned") to its (positive, negative) distance arrays; all
    subplots share the x axis and the bins, so the models' separations compare directly.
    """
    if not series:
        raise ValueError("no distance series to plot")
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (pos, neg) in series.items():
        p = np.asarray(pos, dtype=np.float64).ravel()
        n = np.asarray(neg, dtype=np.float64).ravel()
        if p.size == 0 or n.size == 0 or not (np.isfinite(p).all() and np.isfinite(n).all()):
            raise ValueError(f"{name}: need non-empty, finite positive and negative distances")
        data[name] = (p, n)

    values = np.concatenate([np.concatenate(pn) for pn in data.values()])
    lo, hi = float(values.min()), float(values.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, _BINS + 1)

    fig = Figure(figsize=(7.0, 2.6 * len(data)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(data), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, (p, n)) in zip(axes, data.items(), strict=True):
        ax.hist(p, bins=bins, density=True, alpha=0.6, color="tab:blue", label=f"positive pairs (n={p.size})")
        ax.hist(n, bins=bins, density=True, alpha=0.6, color="tab:red", label=f"negative pairs (n={n.size})")
        ax.set_title(name)
        ax.set_ylabel("density")
        ax.legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel("Euclidean distance between descriptors")
    fig.suptitle(title)

    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_margin_search(trials: list[dict], chosen: tuple[float, float] | None, path: Path, title: str,
                       grid: tuple[list[float], list[float]] | None = None) -> None:
    """Write a PNG of val mAP over (m+, m−): a heat map when the trials form `grid` (m+ values, m− values; cells
    with m+ ≥ m− are not allowed and left blank), else a scatter coloured by val mAP. `trials` are dicts with
    pos_margin, neg_margin, best_val_map (NaN for a failed trial) and status; `chosen` (if any) is marked."""
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    scores = [t["best_val_map"] for t in trials if np.isfinite(t["best_val_map"])]
    norm = {"vmin": min(scores), "vmax": max(scores)} if scores else {"vmin": 0.0, "vmax": 1.0}
    if grid is not None:
        pos_values, neg_values = grid
        cells = np.full((len(pos_values), len(neg_values)), np.nan)
        for t in trials:
            cells[pos_values.index(t["pos_margin"]), neg_values.index(t["neg_margin"])] = t["best_val_map"]
        ax.set_facecolor("0.92")  # cells without a score: not allowed (m+ ≥ m−) or failed
        image = ax.imshow(cells, origin="lower", cmap="viridis", aspect="auto", **norm)
        status = {(t["pos_margin"], t["neg_margin"]): t["status"] for t in trials}
        for r, pos in enumerate(pos_values):
            for c, neg in enumerate(neg_values):
                value = cells[r, c]
                if np.isfinite(value):
                    label = f"{value:.3f}" + ("*" if status[pos, neg] == "stopped early" else "")
                    dark = image.norm(value) < 0.5
                    ax.text(c, r, label, ha="center", va="center", color="white" if dark else "black")
                else:
                    label = "failed" if status.get((pos, neg)) == "error" else "m+ ≥ m−" if pos >= neg else "not run"
                    ax.text(c, r, label, ha="center", va="center", color="0.4", fontsize="small")
        ax.set_xticks(range(len(neg_values)), [f"{v:g}" for v in neg_values])
        ax.set_yticks(range(len(pos_values)), [f"{v:g}" for v in pos_values])
        r, c = pos_values.index(chosen[0]), neg_values.index(chosen[1])
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5, label="chosen"))
        if any(t["status"] == "stopped early" for t in trials):
            ax.set_xlabel("m− (negative margin)    * stopped early by ASHA")
        else:
            ax.set_xlabel("m− (negative margin)")
    else:
        done = [t for t in trials if np.isfinite(t["best_val_map"])]
        image = ax.scatter([t["neg_margin"] for t in done], [t["pos_margin"] for t in done],
                           c=[t["best_val_map"] for t in done], cmap="viridis", s=80, **norm)
        failed = [t for t in trials if not np.isfinite(t["best_val_map"])]
        if failed:
            ax.scatter([t["neg_margin"] for t in failed], [t["pos_margin"] for t in failed], marker="x", color="black", label="failed")
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="m+ = m− (not allowed above)")
        if chosen is not None:
            ax.scatter([chosen[1]], [chosen[0]], marker="*", s=300, facecolor="none", edgecolor="red", label="chosen")
        ax.set_xlabel("m− (negative margin)")
        ax.legend(loc="best", fontsize="small")
    if trials:
        fig.colorbar(image, ax=ax, label="best val mAP")
    ax.set_ylabel("m+ (positive margin)")
    ax.set_title(title, fontsize="medium")
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
