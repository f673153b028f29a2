import numpy as np
import pytest

from components.search.rerank import k_reciprocal_distances, k_reciprocal_distances_self


def _circle(degrees: list[float]) -> np.ndarray:
    """Unit vectors at these angles in a plane: the distance 2 − 2cos grows with the angle between two of them."""
    r = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    centres = rng.normal(size=(6, d))
    x = centres[rng.integers(0, 6, n)] + 0.7 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_k_reciprocal_puts_the_query_s_own_cluster_first():
    # Angles in degrees. Query q at 0, of class A = {−3.6, −4.7, −5.5, −6.6}, a loose group; hub h at 3 and class
    # B = {4.1, 4.3, …, 5.6}, seven items tight around 4-5.6. k1 = 5, k2 = 1 (no query expansion), λ = 0.3.
    # Originally h (3°) is q's nearest, a₁ = −3.6 second. k-reciprocal sets:
    # - N(h, 5) = h and its five nearest B items (all within 2.1° < 3°), so q ∉ N(h, 5): h ∉ R(q, 5); every B item
    #   likewise has its five nearest among B ∪ {h} (all within 1.5°), so R(q, 5) ∩ B = ∅.
    # - N(a₁, 5) = a₁, a₂, a₃, a₄ (≤ 3°), then q (3.6°): q ∈ N(a₁, 5) and a₁ ∈ N(q, 5), so R(q, 5) = {q, a₁}; the
    #   expansion adds nothing (R(a₁, 2) = {a₁, a₂} shares only a₁ with it: 1 ≤ ⅔·2), so R*(q) = {q, a₁}.
    # - R*(h) and R*(b) lie in {h} ∪ B, disjoint from {q, a₁}: their Jaccard distance to q is 1 and d* ≥ 0.7, while
    #   a₁ ∈ R*(a₁) and q ∈ R*(a₁) (R is symmetric) give d_J(q, a₁) < 1; here d*(q, a₁) ≈ 0.62 < d*(q, h) ≈ 0.76.
    query = _circle([0.0])
    hub, b_class, a_class = [3.0], [4.1, 4.3, 4.6, 4.8, 5.1, 5.3, 5.6], [-3.6, -4.7, -5.5, -6.6]
    database = _circle(hub + b_class + a_class)
    is_a = np.array([False] * 8 + [True] * 4)
    original = 2 - 2 * query @ database.T
    assert np.argmin(original[0]) == 0 and not is_a[0]  # the hub, of the wrong class
    reranked = k_reciprocal_distances(query, database, k1=5, k2=1, lambda_value=0.3)
    assert reranked.shape == (1, 12)
    assert np.argmin(reranked[0]) == 8 and is_a[8]  # a₁, of the query's class
    assert reranked[0, ~is_a].min() >= 0.7  # Jaccard distance 1 to everything outside A


def test_lambda_one_is_the_normalised_original_distance():
    rng = np.random.default_rng(0)
    x = _unit(rng, 60, 8)
    queries, database = x[:10], x[10:]
    dist = k_reciprocal_distances(queries, database, k1=6, k2=3, lambda_value=1.0)
    original = np.maximum(2 - 2 * queries.astype(np.float64) @ x.T, 0)  # each row normalised by its max over all items
    expected = original[:, 10:] / original.max(axis=1, keepdims=True)
    np.testing.assert_allclose(dist, expected, atol=1e-6)
    assert np.array_equal(np.argsort(dist, axis=1), np.argsort(-(queries @ database.T), axis=1))


def test_self_version_is_leave_one_out_of_the_general_one():
    rng = np.random.default_rng(1)
    x = _unit(rng, 40, 6)
    dist = k_reciprocal_distances_self(x, k1=5, k2=2, lambda_value=0.3)
    assert dist.shape == (40, 40) and np.isposinf(np.diag(dist)).all()
    assert np.isfinite(dist[~np.eye(40, dtype=bool)]).all()
    for i in (0, 17, 39):  # query i against the other 39: the same 40 items, only the order differs
        others = np.delete(np.arange(40), i)
        general = k_reciprocal_distances(x[i : i + 1], x[others], k1=5, k2=2, lambda_value=0.3)[0]
        np.testing.assert_allclose(dist[i, others], general, atol=1e-6)
        assert np.array_equal(np.argsort(dist[i, others]), np.argsort(general))


def test_reranking_changes_the_order_with_the_defaults():
    x = _unit(np.random.default_rng(2), 80, 8)
    dist = k_reciprocal_distances(x[:5], x[5:])
    assert dist.shape == (5, 75) and np.isfinite(dist).all() and (dist >= 0).all() and (dist <= 1 + 1e-6).all()
    assert not np.array_equal(np.argsort(dist, axis=1), np.argsort(-(x[:5] @ x[5:].T), axis=1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k1": 0}, "k1 must be an integer >= 1"),
        ({"k1": 2.5}, "k1 must be an integer >= 1"),
        ({"k1": True}, "k1 must be an integer >= 1"),
        ({"k2": 0}, "k2 must be an integer >= 1"),
        ({"k1": 4, "k2": 5}, "k2 must be <= k1"),
        ({"k1": 30, "k2": 2}, "k1 must be smaller than the number of items \\(30\\)"),
        ({"lambda_value": -0.1}, "lambda_value must be in \\[0, 1\\]"),
        ({"lambda_value": 1.5}, "lambda_value must be in \\[0, 1\\]"),
    ],
)
def test_bad_parameters_raise(kwargs, match):
    x = _unit(np.random.default_rng(3), 30, 4)
    params = {"k1": 5, "k2": 2, "lambda_value": 0.3, **kwargs}
    with pytest.raises(ValueError, match=match):
        k_reciprocal_distances(x[:10], x[10:], **params)
    with pytest.raises(ValueError, match=match):
        k_reciprocal_distances_self(x, **params)


def test_bad_shapes_raise():
    x = _unit(np.random.default_rng(4), 30, 4)
    with pytest.raises(ValueError, match="same dimension"):
        k_reciprocal_distances(x[:5], np.ones((25, 3), np.float32) / np.sqrt(3))
    with pytest.raises(ValueError, match="not L2-normalised"):
        k_reciprocal_distances(x[:5] * 2, x[5:])
    with pytest.raises(ValueError, match="non-empty 2-D"):
        k_reciprocal_distances_self(x[0])
