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


def plot_search(trials: list[dict], axes: list[str], chosen: dict | None, path: Path, title: str,
                grid: dict[str, list] | None = None) -> None:
    """Write a PNG of the search's best val mAP over its params: one axis a curve; two (y = axes[0], x = axes[1], e.g.
    m+ over m−) a heat map when the trials form `grid` (path → values; a grid point no trial ran, e.g. one with m+ ≥
    m−, reads "not run"), else a scatter coloured by val mAP — more axes: the first two.
    `trials` are dicts with each axis path, best_val_map (NaN for a failed trial) and status; `chosen` (a point) is
    marked."""
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    name = {a: a.rsplit(".", 1)[-1] for a in axes}
    scores = [t["best_val_map"] for t in trials if np.isfinite(t["best_val_map"])]
    norm = {"vmin": min(scores), "vmax": max(scores)} if scores else {"vmin": 0.0, "vmax": 1.0}
    image = None
    if len(axes) == 1:
        (x,) = axes
        done = sorted((t for t in trials if np.isfinite(t["best_val_map"])), key=lambda t: t[x])
        ax.plot([t[x] for t in done], [t["best_val_map"] for t in done], marker="o")
        if chosen is not None:
            ax.axvline(chosen[x], color="red", linestyle="--", label="chosen")
            ax.legend(loc="best", fontsize="small")
        ax.set_xlabel(name[x])
        ax.set_ylabel("best val mAP")
    elif grid is not None and len(axes) == 2:
        y, x = axes
        y_values, x_values = grid[y], grid[x]
        cells = np.full((len(y_values), len(x_values)), np.nan)
        status = {(t[y], t[x]): t["status"] for t in trials}
        for t in trials:
            cells[y_values.index(t[y]), x_values.index(t[x])] = t["best_val_map"]
        ax.set_facecolor("0.92")  # cells without a score: not allowed, not run or failed
        image = ax.imshow(cells, origin="lower", cmap="viridis", aspect="auto", **norm)
        for r, y_value in enumerate(y_values):
            for c, x_value in enumerate(x_values):
                value = cells[r, c]
                if np.isfinite(value):
                    label = f"{value:.3f}" + ("*" if status[y_value, x_value] == "stopped early" else "")
                    dark = image.norm(value) < 0.5
                    ax.text(c, r, label, ha="center", va="center", color="white" if dark else "black")
                else:
                    label = "failed" if status.get((y_value, x_value)) == "error" else "not run"
                    ax.text(c, r, label, ha="center", va="center", color="0.4", fontsize="small")
        ax.set_xticks(range(len(x_values)), [f"{v:g}" for v in x_values])
        ax.set_yticks(range(len(y_values)), [f"{v:g}" for v in y_values])
        if chosen is not None:
            r, c = y_values.index(chosen[y]), x_values.index(chosen[x])
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5, label="chosen"))
        stopped = any(t["status"] == "stopped early" for t in trials)
        ax.set_xlabel(name[x] + ("    * stopped early by ASHA" if stopped else ""))
        ax.set_ylabel(name[y])
    else:
        y, x = axes[:2]
        done = [t for t in trials if np.isfinite(t["best_val_map"])]
        image = ax.scatter([t[x] for t in done], [t[y] for t in done], c=[t["best_val_map"] for t in done],
                           cmap="viridis", s=80, **norm)
        failed = [t for t in trials if not np.isfinite(t["best_val_map"])]
        if failed:
            ax.scatter([t[x] for t in failed], [t[y] for t in failed], marker="x", color="black", label="failed")
        if chosen is not None:
            ax.scatter([chosen[x]], [chosen[y]], marker="*", s=300, facecolor="none", edgecolor="red", label="chosen")
        ax.set_xlabel(name[x])
        ax.set_ylabel(name[y])
        ax.legend(loc="best", fontsize="small")
    if trials and image is not None:
        fig.colorbar(image, ax=ax, label="best val mAP")
    ax.set_title(title, fontsize="medium")
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
