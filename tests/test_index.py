"""faiss search over unit vectors: exact checked against numpy brute force; HNSW and IVF-PQ by their recall of it."""

import numpy as np
import pytest

from components.search.index import (IndexSpec, build_index, l2_distance_from_ip, load_index, save_index, search,
                                     set_search_parameters)
from pipelines.params import ParamsError, load_params
from tests.conftest import REPO


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


def _clustered(rng: np.random.Generator, n: int, d: int, clusters: int) -> np.ndarray:
    centres = _unit(rng, clusters, d)
    x = centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, d)).astype(np.float32) / np.sqrt(d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall_at_10(index, db: np.ndarray, queries: np.ndarray) -> float:
    _, found = search(index, queries, k=10)
    exact = np.argsort(-(queries @ db.T), axis=1)[:, :10]
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)]))


@pytest.fixture
def clustered():
    rng = np.random.default_rng(3)
    x = _clustered(rng, 1050, 16, clusters=8)
    return x[:1000], x[1000:]


def test_default_spec_is_the_exact_flat_index(data):
    db, _ = data
    index = build_index(db)
    assert IndexSpec().factory() == "Flat" and index.ntotal == 200 and index.metric_type == 0  # METRIC_INNER_PRODUCT


def test_hnsw_recalls_the_exact_neighbours_and_keeps_ef_search(clustered, tmp_path):
    db, queries = clustered
    spec = IndexSpec("hnsw", hnsw_m=16, ef_search=48)
    index = build_index(db, spec)
    assert spec.factory() == "HNSW16" and index.ntotal == len(db)
    assert _recall_at_10(index, db, queries) >= 0.95
    save_index(index, tmp_path / "hnsw.faiss")
    assert load_index(tmp_path / "hnsw.faiss").hnsw.efSearch == 48


def test_ivfpq_recall_grows_with_nprobe_which_travels_with_the_file(clustered, tmp_path):
    db, queries = clustered
    index = build_index(db, IndexSpec("ivfpq", nlist=8, pq_m=8, nprobe=1))  # 2-d sub-vectors: a fine code
    narrow = _recall_at_10(index, db, queries)
    set_search_parameters(index, IndexSpec("ivfpq", nlist=8, pq_m=8, nprobe=8))  # every cell: only PQ error left
    wide = _recall_at_10(index, db, queries)
    assert index.nprobe == 8 and wide > narrow and wide >= 0.85
    save_index(index, tmp_path / "ivfpq.faiss")
    assert load_index(tmp_path / "ivfpq.faiss").nprobe == 8


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (IndexSpec("ivfpq", nlist=8, pq_m=5), "must divide the descriptor dimension 16"),
        (IndexSpec("ivfpq", nlist=512, pq_m=8), "at least max"),
    ],
)
def test_ivfpq_that_cannot_train_raises(clustered, spec, message):
    db, _ = clustered
    with pytest.raises(ValueError, match=message):
        build_index(db[:300], spec)


def test_index_params_are_validated(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("  kind: flat ", "  kind: annoy ", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match="index.kind"):
        load_params(tmp_path / "params.yaml")
