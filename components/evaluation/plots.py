"""Figures for evaluation reports (rendered with the Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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
