"""Both test protocols, per query, with class-bootstrap CIs and paired gains."""

import numpy as np
import pytest

from components.evaluation.metrics import average_precision
from components.evaluation.protocol import Figures, leave_one_out_map, score_test
from components.search.postprocess import Reranking


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _set(noise: float, seed: int = 0, classes: int = 8, per_class: int = 6):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(100).normal(size=(classes, 12))
    labels = np.repeat(np.arange(classes), per_class)
    x = _unit(centres[labels] + noise * rng.normal(size=(len(labels), 12)))
    is_query = np.tile(np.arange(per_class) < 2, classes)  # 2 queries per class, as the Firearm protocol
    return x[is_query], labels[is_query], x[~is_query], labels[~is_query]


def test_firearm_and_leave_one_out_scores_match_hand_computed_ap():
    q, ql, d, dl = _set(1.0)
    scores = score_test(q, ql, d, dl, Reranking(), Figures((1, 5), (1, 2)))
    firearm, loo = scores.per_query["firearm"], scores.per_query["leave_one_out"]
    assert len(firearm["ap"]) == len(q) and len(loo["ap"]) == len(q) + len(d)
    order = np.argsort(-(q[0] @ d.T), kind="stable")
    assert firearm["ap"][0] == pytest.approx(average_precision(dl[order] == ql[0]))
    everything, labels = np.concatenate([q, d]), np.concatenate([ql, dl])
    sims = everything[3] @ everything.T
    sims[3] = -np.inf
    order = np.argsort(-sims, kind="stable")[:-1]  # itself (−inf) last, dropped
    assert loo["ap"][3] == pytest.approx(average_precision(labels[order] == labels[3]))
    assert np.mean(loo["ap"]) == pytest.approx(leave_one_out_map(everything, labels))
    assert set(firearm) == {"ap", "map@r", "cmc@1", "cmc@5", "recall@1", "recall@2"}


def test_summary_has_a_ci_around_each_figure_and_counts():
    q, ql, d, dl = _set(1.0)
    summary = score_test(q, ql, d, dl).summary(resamples=300, confidence=0.95, seed=0)
    for protocol in ("firearm", "leave_one_out"):
        m = summary[protocol]["map"]
        assert m["lo"] <= m["value"] <= m["hi"] and m["hi"] - m["lo"] > 0
    assert summary["firearm"]["queries"] == 16 and summary["firearm"]["database"] == 32
    assert summary["leave_one_out"]["queries"] == 48


def test_a_better_system_has_a_paired_gain_above_zero_and_a_system_has_none_over_itself():
    q, ql, d, dl = _set(1.4)
    worse = score_test(q, ql, d, dl)
    qb, _, db, _ = _set(0.5)
    better = score_test(qb, ql, db, dl)
    gain = better.gain_over(worse, resamples=300, confidence=0.95, seed=0)["leave_one_out"]["map"]
    assert gain["lo"] > 0 and gain["diff"] > 0.1
    same = worse.gain_over(worse, resamples=300, confidence=0.95, seed=0)["firearm"]["map"]
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0}


def test_systems_scored_on_different_queries_cannot_be_compared():
    a = score_test(*_set(1.0))
    q, ql, d, dl = _set(1.0, classes=6)
    with pytest.raises(ValueError, match="different queries"):
        a.gain_over(score_test(q, ql, d, dl), resamples=100, confidence=0.95, seed=0)
