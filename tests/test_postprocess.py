import numpy as np
import pytest

from components.search.postprocess import alpha_query_expansion, database_augmentation


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# q = e1; d1 is closer to q (cos ≈ 0.894) than d2 (cos ≈ 0.707); d3 points away from q
QUERY = _unit([[1.0, 0.0, 0.0]])
DB = _unit([[1.0, 0.5, 0.0], [1.0, 0.0, 1.0], [-1.0, 0.2, 0.0]])


def test_alpha_zero_one_neighbour_is_average_query_expansion():
    out = alpha_query_expansion(QUERY, DB, k=1, alpha=0.0)
    np.testing.assert_allclose(out, _unit(QUERY + DB[[0]]), atol=1e-6)


def test_alpha_zero_weighs_neighbours_equally():
    out = alpha_query_expansion(QUERY, DB, k=2, alpha=0.0)
    np.testing.assert_allclose(out, _unit(QUERY + DB[0] + DB[1]), atol=1e-6)


def test_large_alpha_is_dominated_by_the_most_similar():
    out = alpha_query_expansion(QUERY, DB, k=2, alpha=30.0)
    # weights: q itself 1, d1 0.894^30 ≈ 0.035, d2 0.707^30 ≈ 3e-5
    np.testing.assert_allclose(out, QUERY, atol=0.05)
    assert out[0, 1] > 100 * out[0, 2] > 0  # d1's direction (e2) outweighs d2's (e3)
    w1, w2 = (QUERY @ DB[:2].T)[0] ** 3
    expected = _unit(QUERY + w1 * DB[0] + w2 * DB[1])
    np.testing.assert_allclose(alpha_query_expansion(QUERY, DB, 2, 3.0), expected, atol=1e-6)


def test_dba_with_k1_keeps_the_database():
    np.testing.assert_allclose(database_augmentation(DB, k=1, alpha=3.0), DB, atol=1e-6)


def test_dba_with_k2_by_hand():
    # cosines: d1·d2 ≈ 0.632, d1·d3 ≈ −0.789, d2·d3 ≈ −0.693 → nearest other vector: d1→d2, d2→d1, d3→d2
    sims = DB @ DB.T
    np.fill_diagonal(sims, -np.inf)
    nn = sims.argmax(axis=1)
    assert nn.tolist() == [1, 0, 1]
    out = database_augmentation(DB, k=2, alpha=1.0)
    expected = _unit(DB + np.maximum(sims[np.arange(3), nn], 0)[:, None] * DB[nn])
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(out[2], DB[2], atol=1e-6)  # a negative similarity gets weight 0 for α > 0
    out0 = database_augmentation(DB, k=2, alpha=0.0)
    np.testing.assert_allclose(out0[0], _unit(DB[0] + DB[1]), atol=1e-6)


def test_invalid_arguments_are_value_errors():
    with pytest.raises(ValueError, match="k must be"):
        alpha_query_expansion(QUERY, DB, k=0, alpha=1.0)
    with pytest.raises(ValueError, match="alpha must be"):
        database_augmentation(DB, k=2, alpha=-1.0)
    with pytest.raises(ValueError, match="not L2-normalised"):
        alpha_query_expansion(2 * QUERY, DB, k=1, alpha=1.0)
    with pytest.raises(ValueError, match="dims"):
        alpha_query_expansion(_unit([[1.0, 0.0]]), DB, k=1, alpha=1.0)


# --- the dense reranking the evaluation ranks with ------------------------------------------------------------------

from dataclasses import asdict  # noqa: E402

from components.search.postprocess import KReciprocal, Reranking, reranked_similarities, reranking_of  # noqa: E402


def _random_unit(n: int, d: int, seed: int) -> np.ndarray:
    return _unit(np.random.default_rng(seed).normal(size=(n, d)))


def test_dense_dba_equals_the_faiss_one():
    db = _random_unit(30, 8, 0)
    dense = reranked_similarities(db[:5], db, Reranking(dba_k=4, dba_alpha=3.0))
    np.testing.assert_allclose(dense, db[:5] @ database_augmentation(db, 4, 3.0).T, atol=1e-5)


def test_dense_qe_equals_the_faiss_one():
    db, q = _random_unit(30, 8, 1), _random_unit(4, 8, 2)
    dense = reranked_similarities(q, db, Reranking(qe_k=3, qe_alpha=1.0))
    np.testing.assert_allclose(dense, alpha_query_expansion(q, db, 3, 1.0) @ db.T, atol=1e-5)


def test_leave_one_out_never_returns_the_query_and_expands_without_it():
    x = _random_unit(12, 6, 3)
    sim = reranked_similarities(x, x, Reranking(qe_k=2, qe_alpha=0.0), leave_one_out=True)
    assert np.isneginf(np.diag(sim)).all() and np.isfinite(sim[~np.eye(12, dtype=bool)]).all()
    # query 0's expansion: itself + its two nearest OTHER items (not itself twice)
    others = x @ x[0]
    others[0] = -np.inf
    top = np.argsort(-others)[:2]
    expanded = _unit(x[0] + x[top].sum(axis=0))
    np.testing.assert_allclose(sim[0, 1:], (x @ expanded)[1:], atol=1e-5)


def test_leave_one_out_needs_the_queries_to_be_the_database():
    with pytest.raises(ValueError, match="leave-one-out"):
        reranked_similarities(_random_unit(3, 4, 0), _random_unit(5, 4, 1), Reranking(), leave_one_out=True)


def _loo_by_hand(x: np.ndarray, dba_k: int, dba_alpha: float, qe_k: int, qe_alpha: float) -> np.ndarray:
    """Leave-one-out the slow way: for each query i, augment every other item without i (its neighbours are found
    with i present, then i is dropped from its sum), expand i over its qe_k nearest, score the others."""
    n = len(x)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    neighbours = np.argsort(-sims, axis=1, kind="stable")[:, : dba_k - 1]
    out = np.full((n, n), -np.inf)
    for i in range(n):
        augmented = {}
        for j in range(n):
            if j == i:
                continue
            total = x[j].astype(np.float64).copy()
            for k in neighbours[j]:
                if k != i:
                    total += max(x[j] @ x[k], 0.0) ** dba_alpha * x[k]
            augmented[j] = total / np.linalg.norm(total)
        others = np.array([j for j in range(n) if j != i])
        scores = np.array([x[i] @ augmented[j] for j in others])
        query = x[i].astype(np.float64).copy()
        if qe_k:
            for r in np.argsort(-scores, kind="stable")[:qe_k]:
                query += max(scores[r], 0.0) ** qe_alpha * augmented[others[r]]
            query /= np.linalg.norm(query)
        out[i, others] = [query @ augmented[j] for j in others]
    return out


@pytest.mark.parametrize("qe_k", [0, 3])
def test_leave_one_out_dba_leaves_the_query_out_of_the_database(qe_k):
    x = _random_unit(15, 5, 4)
    fast = reranked_similarities(x, x, Reranking(dba_k=3, dba_alpha=2.0, qe_k=qe_k, qe_alpha=1.0), leave_one_out=True)
    slow = _loo_by_hand(x, 3, 2.0, qe_k, 1.0)
    assert np.isneginf(np.diag(fast)).all()
    off = ~np.eye(15, dtype=bool)
    np.testing.assert_allclose(fast[off], slow[off], atol=1e-5)
    # it differs from augmenting with the query inside (which would leak the query into its own results)
    leaky = x @ database_augmentation(x, 3, 2.0).T
    assert not np.allclose(fast[off], leaky[off], atol=1e-3)


def test_k_reciprocal_replaces_dba_and_qe_and_bad_k_raises():
    for other in ({"qe_k": 2}, {"dba_k": 2}):
        with pytest.raises(ValueError, match="replaces DBA and αQE"):
            Reranking(**other, k_reciprocal=KReciprocal())
    with pytest.raises(ValueError, match="k must be"):
        Reranking(dba_k=-1)


def test_a_search_models_meta_gives_back_its_reranking():
    chosen = Reranking(k_reciprocal=KReciprocal(10, 4, 0.2))
    assert reranking_of({"reranking": asdict(Reranking(dba_k=3, qe_k=2))}) == Reranking(dba_k=3, qe_k=2)
    assert reranking_of({"reranking": asdict(chosen)}) == chosen
    assert reranking_of({"arch": "any network without a choice"}) == Reranking()
