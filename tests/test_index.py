"""Exact faiss search over unit vectors, checked against numpy brute force."""

import numpy as np
import pytest

from components.search.index import build_index, l2_distance_from_ip, load_index, save_index, search


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    return _unit(rng, 200, 16), _unit(rng, 12, 16)


def test_search_matches_brute_force(data):
    db, queries = data
    scores, indices = search(build_index(db), queries, k=10)
    sims = queries @ db.T
    expected = np.argsort(-sims, axis=1)[:, :10]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, axis=1), atol=1e-5)
    assert indices.shape == scores.shape == (12, 10)


def test_save_load_round_trip(data, tmp_path):
    db, queries = data
    index = build_index(db)
    path = tmp_path / "db.faiss"
    save_index(index, path)
    assert [p.name for p in tmp_path.iterdir()] == ["db.faiss"]
    loaded = load_index(path)
    assert loaded.ntotal == 200
    for a, b in zip(search(index, queries, 5), search(loaded, queries, 5), strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_missing_index_names_path(tmp_path):
    path = tmp_path / "missing.faiss"
    with pytest.raises(FileNotFoundError, match="missing.faiss"):
        load_index(path)


def test_k_larger_than_index_is_clipped(data):
    db, queries = data
    scores, indices = search(build_index(db[:3]), queries, k=50)
    assert scores.shape == indices.shape == (12, 3)
    assert (np.sort(indices, axis=1) == np.arange(3)).all()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda x: x * 2.0, "not L2-normalised"),
        (lambda x: np.where(np.arange(x.shape[0])[:, None] == 5, np.nan, x), "NaN"),
        (lambda x: x[0], "2-D"),
        (lambda x: x[:0], "non-empty"),
    ],
)
def test_invalid_descriptors_raise(data, bad, message):
    db, queries = data
    with pytest.raises(ValueError, match=message):
        build_index(bad(db))
    with pytest.raises(ValueError, match=message):
        search(build_index(db), bad(queries), k=3)


def test_query_dimension_mismatch_raises(data):
    db, _ = data
    with pytest.raises(ValueError, match="dims"):
        search(build_index(db), _unit(np.random.default_rng(0), 2, 8), k=3)


def test_float64_input_is_accepted(data):
    db, queries = data
    _, indices = search(build_index(db.astype(np.float64)), queries.astype(np.float64), k=1)
    np.testing.assert_array_equal(indices[:, 0], np.argmax(queries @ db.T, axis=1))


def test_l2_distance_from_ip_matches_numpy(data):
    db, queries = data
    scores, indices = search(build_index(db), queries, k=10)
    expected = np.linalg.norm(queries[:, None, :] - db[indices], axis=2)
    np.testing.assert_allclose(l2_distance_from_ip(scores), expected, atol=1e-3)
    assert l2_distance_from_ip(np.array([1.0001]))[0] == 0.0
