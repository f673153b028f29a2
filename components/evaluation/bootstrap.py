"""Class-level bootstrap confidence intervals for retrieval metrics, single-system and paired.

Queries of one class are correlated (they share gallery items and the class's difficulty), so the unit of
resampling is the test class: a resample draws n_classes classes with replacement and pools all queries of
the drawn classes (a class drawn twice counts twice). With class sums s_c, class query counts n_c and draw
counts w_c, the resample's mean is (w @ s) / (w @ n).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def _class_index(query_classes: npt.ArrayLike) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    """(class index of each query, number of queries per class), with at least two classes."""
    classes = np.asarray(query_classes)
    if classes.ndim != 1:
        raise ValueError(f"query_classes must be 1-D (one class per query), got shape {classes.shape}")
    _, inverse = np.unique(classes, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    if counts.size < 2:
        raise ValueError(f"a class bootstrap needs at least 2 classes, got {counts.size}")
    return inverse, counts


def _checked_scores(per_query: dict[str, npt.ArrayLike], n_queries: int) -> dict[str, npt.NDArray[np.float64]]:
    if not per_query:
        raise ValueError("no per-query scores given")
    scores = {}
    for key, values in per_query.items():
        v = np.asarray(values, dtype=np.float64)
        if v.shape != (n_queries,):
            raise ValueError(f"scores {key!r} have shape {v.shape}, but query_classes names {n_queries} queries")
        if not np.isfinite(v).all():
            raise ValueError(f"scores {key!r} hold NaN or infinite values")
        scores[key] = v
    return scores


def _resampled_means(
    scores: dict[str, npt.NDArray[np.float64]],
    inverse: npt.NDArray[np.intp],
    counts: npt.NDArray[np.float64],
    n_resamples: int,
    confidence: float,
    seed: int,
) -> dict[str, npt.NDArray[np.float64]]:
    """Bootstrap distribution (n_resamples,) of each metric's mean; one draw matrix shared by all metrics."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples}")
    n_classes = counts.size
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_classes, np.full(n_classes, 1.0 / n_classes), size=int(n_resamples)).astype(np.float64)
    pooled = draws @ counts
    return {key: draws @ np.bincount(inverse, weights=v, minlength=n_classes) / pooled for key, v in scores.items()}


def _interval(samples: npt.NDArray[np.float64], confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(samples, [tail, 1.0 - tail])
    return float(lo), float(hi)


def class_bootstrap_ci(
    per_query: dict[str, npt.ArrayLike],
    query_classes: npt.ArrayLike,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per metric {"value": mean over queries, "lo", "hi"}: percentile bootstrap CI over test classes."""
    inverse, counts = _class_index(query_classes)
    scores = _checked_scores(per_query, inverse.size)
    samples = _resampled_means(scores, inverse, counts, n_resamples, confidence, seed)
    result = {}
    for key, v in scores.items():
        lo, hi = _interval(samples[key], confidence)
        result[key] = {"value": float(v.mean()), "lo": lo, "hi": hi}
    return result


def paired_bootstrap_diff(
    a: dict[str, npt.ArrayLike],
    b: dict[str, npt.ArrayLike],
    query_classes: npt.ArrayLike,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per metric {"diff": mean(a) - mean(b), "lo", "hi"}, both systems scored on the same resampled classes.

    `a` and `b` hold per-query scores of two systems on the same queries in the same order, with the same keys.
    Since both means share the resample's denominator, mean_w(a) - mean_w(b) = mean_w(a - b).
    """
    if set(a) != set(b):
        raise ValueError(
            f"systems must report the same metrics; only in a: {sorted(set(a) - set(b))}, "
            f"only in b: {sorted(set(b) - set(a))}"
        )
    inverse, _ = _class_index(query_classes)
    sa, sb = _checked_scores(a, inverse.size), _checked_scores(b, inverse.size)
    cis = class_bootstrap_ci({key: sa[key] - sb[key] for key in sa}, query_classes, n_resamples, confidence, seed)
    return {key: {"diff": ci["value"], "lo": ci["lo"], "hi": ci["hi"]} for key, ci in cis.items()}


def format_gain(d: dict[str, float]) -> str:
    """A paired difference as "+0.0670 [+0.0540, +0.0810]"."""
    missing = {"diff", "lo", "hi"} - set(d)
    if missing:
        raise ValueError(f"a gain needs keys 'diff', 'lo' and 'hi'; missing {sorted(missing)}")
    return f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
