"""Distance-histogram figure."""

import numpy as np
import pytest

from components.evaluation.plots import plot_distance_histograms


def test_plot_distance_histograms_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    series = {
        "fine-tuned": (rng.normal(0.6, 0.1, 300), rng.normal(1.2, 0.1, 3000)),
        "off-the-shelf": (rng.normal(0.9, 0.2, 300), rng.normal(1.1, 0.2, 3000)),
    }
    path = tmp_path / "distances.png"
    plot_distance_histograms(series, path, "Pair distances")
    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["distances.png"]


def test_plot_distance_histograms_rejects_empty(tmp_path):
    with pytest.raises(ValueError):
        plot_distance_histograms({}, tmp_path / "x.png", "t")
    with pytest.raises(ValueError, match="fine-tuned"):
        plot_distance_histograms({"fine-tuned": (np.array([]), np.array([1.0]))}, tmp_path / "x.png", "t")
    assert not any(tmp_path.iterdir())
