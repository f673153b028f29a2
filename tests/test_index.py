"""faiss search over unit vectors: exact checked against numpy brute force; HNSW, IVF-Flat and IVF-PQ by their
recall of it; the shard-wise build by its equality with the whole one and by how many shards it holds at once."""

import weakref

import numpy as np
import pytest

from components.search.index import (EXACT_UP_TO, IndexSpec, build_index, build_index_from_shards, l2_distance_from_ip,
                                     refined_search,
                                     load_index, save_index, search, set_search_parameters)
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


class LiveShards:
    """Shard loaders that hand out fresh copies of slices of `x` and count how many of them are alive at once."""

    def __init__(self, x: np.ndarray, parts: int) -> None:
        self.slices, self.alive, self.most_alive, self.loads = np.array_split(x, parts), 0, 0, 0

    def loaders(self):
        return [lambda i=i: self._load(i) for i in range(len(self.slices))]

    def _load(self, i: int) -> np.ndarray:
        shard = self.slices[i].copy()
        self.alive, self.loads = self.alive + 1, self.loads + 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(shard, self._freed)
        return shard

    def _freed(self) -> None:
        self.alive -= 1


@pytest.mark.parametrize("spec", [IndexSpec("flat"), IndexSpec("ivfflat", nlist=8, nprobe=2),
                                  IndexSpec("ivfpq", nlist=8, pq_m=8, nprobe=2)])
def test_a_shard_wise_build_equals_the_whole_one_and_holds_one_shard_at_a_time(clustered, spec):
    db, queries = clustered
    shards = LiveShards(db, 5)
    sharded = build_index_from_shards(shards.loaders(), spec)  # the sample (all 1,000 rows) in shard order
    whole = build_index(db, spec)
    assert shards.most_alive == 1 and shards.alive == 0 and sharded.ntotal == len(db)
    for a, b in zip(search(sharded, queries, 10), search(whole, queries, 10), strict=True):
        np.testing.assert_array_equal(a, b)  # same training rows, same ids: rows numbered across shards


def test_ivfflat_from_shards_trains_on_a_sample_and_recalls_more_with_nprobe(clustered):
    db, queries = clustered
    shards = LiveShards(db, 4)
    index = build_index_from_shards(shards.loaders(), IndexSpec("ivfflat", nlist=16, nprobe=1, train_sample=400))
    narrow = _recall_at_10(index, db, queries)
    set_search_parameters(index, IndexSpec("ivfflat", nlist=16, nprobe=16))  # every cell: exact
    assert shards.most_alive == 1 and index.nprobe == 16 and narrow < _recall_at_10(index, db, queries) == 1.0


def test_ids_continue_across_shards_from_first_id(clustered):
    db, queries = clustered
    index = build_index_from_shards(LiveShards(db, 3).loaders(), IndexSpec("hnsw", hnsw_m=16, ef_search=64),
                                    first_id=500)
    _, found = search(index, db[[0, 400, 999]], k=1)
    np.testing.assert_array_equal(found[:, 0], [500, 900, 1499])


def test_shards_that_disagree_are_refused(clustered):
    db, _ = clustered
    with pytest.raises(ValueError, match="shard 1 has shape"):
        build_index_from_shards([lambda: db[:10], lambda: db[:10, :8]])
    grown = iter([db[:10], db[:12]])  # the first pass saw 10 rows, the second gets 12
    with pytest.raises(ValueError, match="12 rows on the second read, 10 on the first"):
        build_index_from_shards([lambda: next(grown)])
    with pytest.raises(ValueError, match="no shards"):
        build_index_from_shards([])


def test_auto_picks_the_kind_by_database_size():
    auto = IndexSpec("auto", pq_m=32)
    assert auto.for_size(EXACT_UP_TO, 1280).kind == "flat"
    assert auto.for_size(1_000_000, 1280).kind == "hnsw"  # 4.9 GiB of vectors
    big = auto.for_size(10_000_000, 1280)
    assert big.kind == "ivfpq" and big.pq_m == 32
    assert auto.for_size(10_000_000, 1000).pq_m == 25  # the largest code size ≤ 32 dividing the dimension
    assert IndexSpec("ivfflat").for_size(10, 16).kind == "ivfflat"
    with pytest.raises(ValueError, match="resolved"):
        auto.factory()


def test_index_params_are_validated(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("  kind: flat ", "  kind: annoy ", 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match="index.kind"):
        load_params(tmp_path / "params.yaml")


def test_refined_search_rescores_the_codes_shortlist_exactly():
    """Coarse IVF-PQ codes (4 bytes for 32 dims) rank poorly; re-scoring 100 candidates against the vectors finds
    the true neighbours, with exact scores, fetching each candidate once per chunk in sorted order; with every row
    as a candidate it is the exact search."""
    rng = np.random.default_rng(5)
    x = _clustered(rng, 3100, 32, clusters=10)
    db, queries = x[:3000], x[3000:]
    index = build_index(db, IndexSpec("ivfpq", nlist=8, pq_m=4, nprobe=8))
    fetched = []

    def rows(ids):
        fetched.append(ids)
        return db[ids]

    scores, ids = refined_search(index, queries, 10, 100, rows)
    exact_scores, exact_ids = search(build_index(db), queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids, strict=True)])
    assert _recall_at_10(index, db, queries) < 0.5 < 0.95 <= recall
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", db[ids], queries), atol=1e-5)
    assert all(np.all(np.diff(f) > 0) for f in fetched)
    everything = refined_search(index, queries, 10, len(db), lambda i: db[i])
    np.testing.assert_array_equal(everything[1], exact_ids)
    np.testing.assert_allclose(everything[0], exact_scores, atol=1e-5)
