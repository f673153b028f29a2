"""Retrieval metrics against hand-computed values."""

import numpy as np
import pytest

from components.evaluation.metrics import (
    average_precision,
    cmc,
    distance_summary,
    evaluate_rankings,
    pair_distances,
)


@pytest.mark.parametrize(
    ("relevant", "n_relevant", "expected"),
    [
        ([1, 0, 1, 0, 0], None, (1 / 1 + 2 / 3) / 2),  # 0.8333
        ([1, 0, 1, 0, 0], 4, (1 / 1 + 2 / 3) / 4),  # two relevant items never retrieved
        ([1, 1, 1, 0, 0], None, 1.0),  # perfect ranking
        ([0, 0, 0, 1, 1], None, (1 / 4 + 2 / 5) / 2),  # worst ranking: 0.325
        ([0, 1, 0, 1], None, (1 / 2 + 2 / 4) / 2),
        ([0, 0, 0], 3, 0.0),  # nothing relevant retrieved
    ],
)
def test_average_precision_hand_computed(relevant, n_relevant, expected):
    assert average_precision(np.array(relevant, dtype=bool), n_relevant) == pytest.approx(expected)


def test_average_precision_known_value():
    assert average_precision(np.array([True, False, True, False, False])) == pytest.approx(0.833333, abs=1e-6)


@pytest.mark.parametrize(("relevant", "n_relevant"), [([0, 0, 0], None), ([0, 0], 0), ([1, 0], 0)])
def test_average_precision_without_relevant_items_raises(relevant, n_relevant):
    with pytest.raises(ValueError, match="R = 0"):
        average_precision(np.array(relevant, dtype=bool), n_relevant)


def test_average_precision_rejects_bad_input():
    with pytest.raises(ValueError, match="smaller than"):
        average_precision(np.array([1, 1, 0], dtype=bool), 1)
    with pytest.raises(ValueError, match="1-D"):
        average_precision(np.ones((2, 2), dtype=bool))


def test_cmc_hand_made():
    rel = np.array(
        [
            [1, 0, 0, 0],  # first hit at rank 1
            [0, 0, 1, 0],  # rank 3
            [0, 0, 0, 0],  # never
            [0, 1, 0, 0],  # rank 2
        ],
        dtype=bool,
    )
    assert cmc(rel, [1, 2, 3, 4, 10]) == pytest.approx({1: 0.25, 2: 0.5, 3: 0.75, 4: 0.75, 10: 0.75})


def test_cmc_rejects_bad_ranks():
    with pytest.raises(ValueError, match=">= 1"):
        cmc(np.ones((2, 3), dtype=bool), [0, 1])


DB_LABELS = np.array(["a", "a", "b", "b", "c"])
QUERY_LABELS = np.array(["a", "b"])
RANKING = np.array(
    [
        [0, 2, 1, 3, 4],  # relevance 1 0 1 0 0 -> AP (1 + 2/3) / 2 = 0.8333
        [4, 0, 2, 1, 3],  # relevance 0 0 1 0 1 -> AP (1/3 + 2/5) / 2 = 0.3667
    ]
)


def test_evaluate_rankings_known_map():
    result = evaluate_rankings(QUERY_LABELS, DB_LABELS, RANKING, ranks=(1, 2, 3))
    assert result == pytest.approx(
        {"map": 0.6, "cmc@1": 0.5, "cmc@2": 0.5, "cmc@3": 1.0, "queries": 2, "database": 5}
    )
    assert isinstance(result["queries"], int) and isinstance(result["database"], int)


def test_evaluate_rankings_truncated_ranking_counts_r_over_database():
    result = evaluate_rankings(QUERY_LABELS, DB_LABELS, RANKING[:, :2], ranks=(1,))
    assert result["map"] == pytest.approx((0.5 + 0.0) / 2)


def test_evaluate_rankings_default_ranks_keys():
    result = evaluate_rankings(QUERY_LABELS, DB_LABELS, RANKING)
    assert set(result) == {"map", "cmc@1", "cmc@5", "cmc@10", "queries", "database"}
    assert result["cmc@5"] == 1.0


def test_evaluate_rankings_queries_without_relevant_items_raise():
    with pytest.raises(ValueError, match="2 of 3 queries"):
        evaluate_rankings(np.array(["a", "z", "y"]), DB_LABELS, np.tile(np.arange(5), (3, 1)))


@pytest.mark.parametrize(
    ("ranking", "message"),
    [
        (np.array([[0, 1, 2, 3, 5], [0, 1, 2, 3, 4]]), "indices must lie"),
        (np.array([[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]), "more than once"),
        (np.array([[0, 1, 2, 3, 4]]), "shape"),
        (np.zeros((2, 6), dtype=int), "database holds only"),
    ],
)
def test_evaluate_rankings_rejects_bad_ranking(ranking, message):
    with pytest.raises(ValueError, match=message):
        evaluate_rankings(QUERY_LABELS, DB_LABELS, ranking)


def test_pair_distances_three_points():
    query = np.array([[0.0, 0.0]])
    db = np.array([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    pos, neg = pair_distances(query, np.array(["a"]), db, np.array(["a", "b", "a"]))
    np.testing.assert_allclose(pos, [5.0, 1.0])
    np.testing.assert_allclose(neg, [2.0])


def test_pair_distances_counts():
    rng = np.random.default_rng(0)
    q_labels, db_labels = np.array([0, 1, 1]), np.array([0, 0, 1, 2])
    pos, neg = pair_distances(rng.normal(size=(3, 4)), q_labels, rng.normal(size=(4, 4)), db_labels)
    assert (pos.size, neg.size) == (2 + 1 + 1, 2 + 3 + 3)


def test_pair_distances_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="one label per"):
        pair_distances(np.zeros((2, 3)), np.array([0]), np.zeros((1, 3)), np.array([0]))


def test_distance_summary():
    summary = distance_summary(np.array([1.0, 3.0]), np.array([1.5, 2.5, 4.0, 0.5]))
    assert summary == pytest.approx(
        {"pos_mean": 2.0, "pos_std": 1.0, "neg_mean": 2.125, "neg_std": np.std([1.5, 2.5, 4.0, 0.5]), "overlap": 0.5}
    )
    with pytest.raises(ValueError, match="at least one"):
        distance_summary(np.array([]), np.array([1.0]))
