"""Class-level bootstrap CIs against cases with a known answer."""

import numpy as np
import pytest

from components.evaluation.bootstrap import class_bootstrap_ci, format_gain, paired_bootstrap_diff

N_CLASSES, PER_CLASS, MU, SIGMA = 200, 4, 0.6, 0.1


def class_level_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query scores that are constant within a class, the constants drawn from N(MU, SIGMA^2)."""
    rng = np.random.default_rng(seed)
    classes = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    return rng.normal(MU, SIGMA, size=N_CLASSES)[classes], classes


def test_ci_width_and_coverage_match_the_normal_theory():
    # The mean of 200 class constants has standard error SIGMA / sqrt(200): a 95% CI is 2 * 1.96 * that wide.
    expected_width = 2 * 1.96 * SIGMA / np.sqrt(N_CLASSES)
    widths, covered = [], 0
    for seed in range(100):
        scores, classes = class_level_scores(seed)
        ci = class_bootstrap_ci({"ap": scores}, classes, n_resamples=500, seed=seed)["ap"]
        assert ci["value"] == pytest.approx(scores.mean())
        assert ci["lo"] < ci["value"] < ci["hi"]
        widths.append(ci["hi"] - ci["lo"])
        covered += ci["lo"] <= MU <= ci["hi"]
    assert np.mean(widths) == pytest.approx(expected_width, rel=0.15)
    assert widths[0] == pytest.approx(expected_width, rel=0.15)
    assert covered >= 90


def test_resamples_whole_classes_and_weights_by_query_count():
    # Class A: 1 query scoring 1; class B: 3 queries scoring 0. The 2-class resamples are AA (mean 1, p=1/4),
    # AB (pooled mean 1/4, p=1/2) and BB (mean 0, p=1/4); the 30% and 70% quantiles both fall on AB. A per-query
    # bootstrap would give other values, and averaging class means would give 1/2.
    scores, classes = np.array([1.0, 0.0, 0.0, 0.0]), np.array(["A", "B", "B", "B"])
    ci = class_bootstrap_ci({"ap": scores}, classes, n_resamples=4000, confidence=0.4)["ap"]
    assert ci == pytest.approx({"value": 0.25, "lo": 0.25, "hi": 0.25})
    wide = class_bootstrap_ci({"ap": scores}, classes, n_resamples=4000, confidence=0.9)["ap"]
    assert (wide["lo"], wide["hi"]) == (0.0, 1.0)


def test_resamples_are_shared_by_all_metrics():
    scores, classes = class_level_scores(3)
    ci = class_bootstrap_ci({"ap": scores, "copy": scores.copy(), "double": 2 * scores}, classes, n_resamples=200)
    assert (ci["copy"]["lo"], ci["copy"]["hi"]) == (ci["ap"]["lo"], ci["ap"]["hi"])
    assert ci["double"]["lo"] == pytest.approx(2 * ci["ap"]["lo"])
    assert ci["double"]["hi"] == pytest.approx(2 * ci["ap"]["hi"])


def test_seed_reproducible():
    scores, classes = class_level_scores(4)
    first = class_bootstrap_ci({"ap": scores}, classes, n_resamples=200, seed=7)
    assert class_bootstrap_ci({"ap": scores}, classes, n_resamples=200, seed=7) == first
    assert class_bootstrap_ci({"ap": scores}, classes, n_resamples=200, seed=8) != first
    b = {"ap": scores - 0.01 * np.random.default_rng(0).normal(size=scores.size)}
    assert paired_bootstrap_diff({"ap": scores}, b, classes, seed=7) == paired_bootstrap_diff({"ap": scores}, b, classes, seed=7)


def test_paired_constant_shift_has_a_degenerate_interval():
    scores, classes = class_level_scores(5)
    d = paired_bootstrap_diff({"ap": scores, "map@r": scores / 2}, {"ap": scores - 0.05, "map@r": scores / 2 - 0.05}, classes)
    for metric in ("ap", "map@r"):
        assert d[metric] == pytest.approx({"diff": 0.05, "lo": 0.05, "hi": 0.05})
    assert format_gain(d["ap"]) == "+0.0500 [+0.0500, +0.0500]"


def test_pairing_separates_a_small_gain_that_unpaired_cis_cannot():
    # Class difficulty (sd 0.1) dominates both systems; the gain is 0.01 plus class-level noise of sd 0.01.
    rng = np.random.default_rng(6)
    a, classes = class_level_scores(6)
    b = a - 0.01 + rng.normal(0.0, 0.01, size=N_CLASSES)[classes]
    paired = paired_bootstrap_diff({"ap": a}, {"ap": b}, classes)["ap"]
    ci_a = class_bootstrap_ci({"ap": a}, classes)["ap"]
    ci_b = class_bootstrap_ci({"ap": b}, classes)["ap"]
    assert paired["diff"] == pytest.approx(a.mean() - b.mean())
    assert paired["lo"] > 0.0  # the paired CI detects the gain ...
    assert ci_a["lo"] < ci_b["hi"]  # ... while the unpaired CIs overlap
    assert paired["hi"] - paired["lo"] < 0.2 * min(ci_a["hi"] - ci_a["lo"], ci_b["hi"] - ci_b["lo"])


def test_format_gain():
    assert format_gain({"diff": 0.067, "lo": 0.054, "hi": 0.081}) == "+0.0670 [+0.0540, +0.0810]"
    assert format_gain({"diff": -0.0012, "lo": -0.01, "hi": 0.0075}) == "-0.0012 [-0.0100, +0.0075]"
    with pytest.raises(ValueError, match="missing"):
        format_gain({"value": 0.1, "lo": 0.0, "hi": 0.2})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query_classes": np.array([0, 0, 1])}, "shape"),
        ({"query_classes": np.zeros(4)}, "at least 2 classes"),
        ({"query_classes": np.zeros((2, 2))}, "1-D"),
        ({"confidence": 1.0}, "confidence"),
        ({"confidence": 0.0}, "confidence"),
        ({"n_resamples": 0}, "n_resamples"),
        ({"per_query": {}}, "no per-query"),
        ({"per_query": {"ap": np.array([0.1, np.nan, 0.3, 0.4])}}, "NaN"),
    ],
)
def test_class_bootstrap_rejects_bad_input(kwargs, message):
    args = {"per_query": {"ap": np.array([0.1, 0.2, 0.3, 0.4])}, "query_classes": np.array([0, 0, 1, 1])} | kwargs
    with pytest.raises(ValueError, match=message):
        class_bootstrap_ci(**args)


def test_paired_bootstrap_rejects_mismatched_systems():
    classes = np.array([0, 0, 1, 1])
    a = {"ap": np.ones(4), "map@r": np.ones(4)}
    with pytest.raises(ValueError, match="only in a: \\['map@r'\\]"):
        paired_bootstrap_diff(a, {"ap": np.ones(4)}, classes)
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap_diff(a, {"ap": np.ones(3), "map@r": np.ones(4)}, classes)
    with pytest.raises(ValueError, match="at least 2 classes"):
        paired_bootstrap_diff(a, a, np.zeros(4))
