"""Retrieval metrics against hand-computed values."""

import numpy as np
import pytest

from components.evaluation.metrics import (
    average_precision,
    cmc,
    distance_summary,
    evaluate_rankings,
    leave_one_out_ranking,
    pair_distances,
    per_query_scores,
    relevance_from_similarity,
    summarise,
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


HAND_REL = np.array(
    [
        [1, 0, 1, 0, 0],  # R=2: mAP@R = (P@1)/2 = 0.5; AP = (1 + 2/3)/2 = 0.8333; first hit rank 1
        [0, 1, 1, 0, 1],  # R=3: mAP@R = (1/2 + 2/3)/3 = 0.3889; AP = (1/2 + 2/3 + 3/5)/3 = 0.5889; first hit rank 2
        [0, 0, 0, 0, 1],  # R=4 (3 never retrieved): mAP@R = 0; AP = (1/5)/4 = 0.05; first hit rank 5
        [1, 1, 0, 0, 0],  # R=2: mAP@R = (1 + 1)/2 = 1; AP = 1
    ],
    dtype=bool,
)
HAND_R = np.array([2, 3, 4, 2])


def test_per_query_scores_hand_made():
    scores = per_query_scores(HAND_REL, HAND_R, cmc_ranks=(1, 5), recall_ks=(1, 2, 4, 8))
    assert set(scores) == {"ap", "map@r", "recall@1", "recall@2", "recall@4", "recall@8", "cmc@1", "cmc@5"}
    np.testing.assert_allclose(scores["map@r"], [0.5, (1 / 2 + 2 / 3) / 3, 0.0, 1.0])
    np.testing.assert_allclose(scores["ap"], [(1 + 2 / 3) / 2, (1 / 2 + 2 / 3 + 3 / 5) / 3, 0.05, 1.0])
    np.testing.assert_array_equal(scores["recall@1"], [1, 0, 0, 1])
    np.testing.assert_array_equal(scores["recall@2"], [1, 1, 0, 1])
    np.testing.assert_array_equal(scores["recall@4"], [1, 1, 0, 1])
    np.testing.assert_array_equal(scores["recall@8"], [1, 1, 1, 1])  # k beyond the ranking's length
    np.testing.assert_array_equal(scores["cmc@1"], scores["recall@1"])
    np.testing.assert_array_equal(scores["cmc@5"], [1, 1, 1, 1])


def test_map_at_r_differs_from_ap_only_beyond_rank_r():
    # R=2, both relevant items at ranks 1 and 3: AP counts the hit at rank 3, mAP@R stops at rank R=2.
    scores = per_query_scores(np.array([[1, 0, 1]], dtype=bool), np.array([2]), cmc_ranks=(), recall_ks=())
    assert scores["ap"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert scores["map@r"][0] == pytest.approx(0.5)


def test_per_query_ap_matches_average_precision():
    rng = np.random.default_rng(0)
    rel = rng.random((60, 25)) < 0.3
    rel[:, 0] |= ~rel.any(axis=1)  # every row holds at least one relevant item
    n_relevant = rel.sum(axis=1) + rng.integers(0, 4, size=60)  # some relevant items beyond the ranking
    scores = per_query_scores(rel, n_relevant, cmc_ranks=(1, 10), recall_ks=(1,))
    expected = [average_precision(row, int(r)) for row, r in zip(rel, n_relevant, strict=True)]
    np.testing.assert_allclose(scores["ap"], expected)
    assert (scores["map@r"] <= scores["ap"] + 1e-12).all()
    assert summarise(scores)["cmc@10"] == pytest.approx(cmc(rel, [10])[10])


def test_per_query_scores_rejects_bad_n_relevant():
    rel = np.array([[1, 0], [0, 0]], dtype=bool)
    with pytest.raises(ValueError, match="R = 0"):
        per_query_scores(rel, np.array([1, 0]), cmc_ranks=(1,), recall_ks=(1,))
    with pytest.raises(ValueError, match="smaller than"):
        per_query_scores(np.array([[1, 1]], dtype=bool), np.array([1]), cmc_ranks=(1,), recall_ks=(1,))
    with pytest.raises(ValueError, match="shape"):
        per_query_scores(rel, np.array([1]), cmc_ranks=(1,), recall_ks=(1,))
    with pytest.raises(ValueError, match=">= 1"):
        per_query_scores(rel, np.array([1, 1]), cmc_ranks=(0,), recall_ks=(1,))


def test_summarise_renames_ap_to_map():
    summary = summarise({"ap": np.array([0.2, 0.4]), "map@r": np.array([0.1, 0.3]), "recall@1": np.array([1.0, 0.0])})
    assert summary == pytest.approx({"map": 0.3, "map@r": 0.2, "recall@1": 0.5})
    with pytest.raises(ValueError, match="no per-query"):
        summarise({})


def test_leave_one_out_ranking_on_a_circle():
    # Four unit vectors at 0, 90, 180 and 270 degrees; classes a, a, b, b. Neighbours at 90 degrees have inner
    # product 0 (a tie, broken by index), the opposite point -1.
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    relevant, n_relevant = leave_one_out_ranking(x, np.array(["a", "a", "b", "b"]))
    expected = np.array(
        [
            [1, 0, 0],  # item 0 ranks 1 (tie with 3, lower index first), 3, 2 -> a b b
            [1, 0, 0],  # item 1 ranks 0, 2 (tie), 3 -> a b b
            [0, 1, 0],  # item 2 ranks 1, 3 (tie), 0 -> a b a
            [0, 1, 0],  # item 3 ranks 0, 2 (tie), 1 -> a b a
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(relevant, expected)
    np.testing.assert_array_equal(n_relevant, [1, 1, 1, 1])  # class size - 1


def test_leave_one_out_ranking_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.array([0, 0, 0, 1, 1, 2, 2])
    relevant, n_relevant = leave_one_out_ranking(x, labels)
    assert relevant.shape == (7, 6)
    np.testing.assert_array_equal(n_relevant, [2, 2, 2, 1, 1, 1, 1])
    for i in range(7):
        others = np.array([j for j in range(7) if j != i])
        ranked = others[np.argsort(-(x[others] @ x[i]), kind="stable")]
        np.testing.assert_array_equal(relevant[i], labels[ranked] == labels[i])


def test_leave_one_out_ranking_singleton_class_raises():
    x = np.eye(3)
    with pytest.raises(ValueError, match="class 'c' has a single item"):
        leave_one_out_ranking(x, np.array(["a", "a", "c"]))


def test_relevance_from_similarity_exclude_mask():
    sim = np.array([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.8, 0.3]])
    db = np.array(["a", "b", "a", "a"])
    exclude = np.array([[0, 0, 0, 1], [1, 0, 0, 0]], dtype=bool)
    relevant, n_relevant = relevance_from_similarity(sim, np.array(["a", "b"]), db, exclude)
    # row 0: order 0, 3, 2, 1 -> drop 3 -> a a b; R counts items 0 and 2, not the excluded 3
    # row 1: order 1, 2 (tie, lower index first), 3, 0 -> drop 0 -> b a a
    np.testing.assert_array_equal(relevant, [[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(n_relevant, [2, 1])
    relevant, n_relevant = relevance_from_similarity(sim, np.array(["a", "b"]), db)
    np.testing.assert_array_equal(relevant, [[1, 1, 1, 0], [1, 0, 0, 0]])  # nothing dropped
    np.testing.assert_array_equal(n_relevant, [3, 1])


def test_relevance_from_similarity_rejects_bad_exclude():
    sim, q, db = np.zeros((2, 3)), np.array([0, 1]), np.array([0, 1, 1])
    with pytest.raises(ValueError, match="same number"):
        relevance_from_similarity(sim, q, db, np.array([[1, 0, 0], [0, 0, 0]], dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        relevance_from_similarity(sim, q, db, np.zeros((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="labels"):
        relevance_from_similarity(sim, q, db[:2])
