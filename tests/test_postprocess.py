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
