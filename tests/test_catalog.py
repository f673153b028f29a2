"""The living index: stable ids across add/remove, atomic generations (a crash mid-write leaves the old index
readable and the write can be rerun), refusal to mix models, DBA for added items, every index kind, and S3."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from components.catalog import store
from components.catalog.describe import DIGEST_KEY
from components.catalog.searcher import Searcher
from components.catalog.store import CatalogError, ModelMismatch, SearchIndex, model_identity
from components.search.index import IndexSpec
from components.search.postprocess import database_augmentation

DIM = 16


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _meta(digest: str = "a" * 64, reranking: dict | None = None) -> dict:
    return {DIGEST_KEY: digest, "arch": "toy", "dim": DIM, "image_size": 32, "scales": [1.0],
            "reranking": reranking or {}}


def _images(start: int, n: int) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"sha{i}" for i in range(start, start + n)],
                         "label": [f"class{i % 3}" for i in range(start, start + n)],
                         "uri": [f"/data/{i}.jpg" for i in range(start, start + n)]})


class VectorDescriber:
    """A describer whose 'images' are already descriptors (the searcher's logic without a network)."""

    def __init__(self, meta: dict) -> None:
        self.meta = meta

    def describe(self, images: list) -> np.ndarray:
        return np.stack(images).astype(np.float32)


@pytest.fixture
def built(tmp_path):
    rng = np.random.default_rng(0)
    x = _unit(rng, 40)
    index = SearchIndex.build(str(tmp_path / "index"), x, _images(0, 40), model_identity(_meta()))
    return index, x, rng


def test_build_open_round_trip_and_layout(built, tmp_path):
    index, x, _ = built
    again = SearchIndex.open(tmp_path / "index")
    assert (tmp_path / "index" / "CURRENT").read_text().strip() == "g000001"
    assert sorted(p.name for p in (tmp_path / "index" / "g000001").iterdir()) == sorted(store._FILES)
    np.testing.assert_array_equal(again.descriptors, x)
    assert again.entries["faiss_id"].tolist() == list(range(40))
    assert again.summary()["count"] == 40 and again.summary()["classes"] == 3


def test_a_database_vector_finds_itself_and_exclusion_drops_it(built):
    index, x, _ = built
    searcher = Searcher(index, VectorDescriber(_meta()))
    top = searcher.search([x[7]], k=3)[0]
    assert top[0].faiss_id == 7 and top[0].score == pytest.approx(1.0, abs=1e-5) and top[0].uri == "/data/7.jpg"
    assert [h.rank for h in top] == [1, 2, 3]
    without = searcher.search([x[7]], k=3, exclude=["sha7"])[0]
    assert 7 not in [h.faiss_id for h in without] and len(without) == 3


def test_add_then_remove_keeps_ids_stable(built, tmp_path):
    index, x, rng = built
    new = _unit(rng, 5)
    report = index.add(new, _images(40, 5), _meta())
    assert report.added == [40, 41, 42, 43, 44] and report.already_indexed == {}
    index = SearchIndex.open(tmp_path / "index")
    assert index.info["generation"] == "g000002" and len(index.entries) == 45
    assert Searcher(index, VectorDescriber(_meta())).search([new[2]], k=1)[0][0].faiss_id == 42
    assert index.remove([3, 42, 999]) == [3, 42]
    index = SearchIndex.open(tmp_path / "index")
    hits = Searcher(index, VectorDescriber(_meta())).search([x[3], new[2], x[10]], k=45)
    assert all(h.faiss_id not in (3, 42) for hs in hits for h in hs)
    assert hits[2][0].faiss_id == 10  # the others keep their ids
    assert [p.name for p in (tmp_path / "index").iterdir() if p.name.startswith("g")] == ["g000003"]  # old dropped
    again = index.add(new[:1], _images(40, 1), _meta())  # already there: reported, not added twice
    assert again.added == [] and again.already_indexed == {"sha40": 40}


def test_crash_mid_add_leaves_the_old_index_and_the_add_can_be_rerun(built, tmp_path, monkeypatch):
    index, _, rng = built
    new = _unit(rng, 3)
    real_write = store._write

    def crash_after_the_faiss_file(uri: str, data: bytes) -> None:
        if uri.endswith("descriptors.npy"):
            raise OSError("disk pulled out")
        real_write(uri, data)

    monkeypatch.setattr(store, "_write", crash_after_the_faiss_file)
    with pytest.raises(OSError, match="disk pulled out"):
        index.add(new, _images(40, 3), _meta())
    monkeypatch.setattr(store, "_write", real_write)
    survivor = SearchIndex.open(tmp_path / "index")
    assert survivor.info["generation"] == "g000001" and len(survivor.entries) == 40
    assert survivor.faiss_index.ntotal == 40
    report = survivor.add(new, _images(40, 3), _meta())  # the rerun: the half-written generation is replaced
    assert report.added == [40, 41, 42]
    assert len(SearchIndex.open(tmp_path / "index").entries) == 43


def test_another_model_is_refused(built):
    index, _, rng = built
    with pytest.raises(ModelMismatch, match="descriptor spaces must not mix"):
        index.add(_unit(rng, 1), _images(40, 1), _meta(digest="b" * 64))
    with pytest.raises(ModelMismatch):
        Searcher(index, VectorDescriber(_meta(digest="b" * 64)))


def test_a_writer_that_read_an_older_generation_is_refused(built, tmp_path):
    index, _, rng = built
    stale = SearchIndex.open(tmp_path / "index")
    index.add(_unit(rng, 1), _images(40, 1), _meta())
    with pytest.raises(CatalogError, match="changed since it was opened"):
        stale.add(_unit(rng, 1), _images(41, 1), _meta())


def test_missing_or_broken_index_is_one_clear_error(tmp_path):
    with pytest.raises(CatalogError, match="no index here"):
        SearchIndex.open(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "CURRENT").write_text("g000001\n")
    with pytest.raises(CatalogError, match="incomplete index generation"):
        SearchIndex.open(tmp_path / "bad")


def test_added_items_are_augmented_over_the_whole_database(tmp_path):
    rng = np.random.default_rng(1)
    x, new = _unit(rng, 30), _unit(rng, 4)
    dba = {"dba_k": 3, "dba_alpha": 3.0}
    index = SearchIndex.build(str(tmp_path / "i"), x, _images(0, 30), model_identity(_meta(reranking=dba)))
    np.testing.assert_allclose(index.faiss_index.reconstruct(5), database_augmentation(x, 3, 3.0)[5], atol=1e-6)
    index.add(new, _images(30, 4), _meta(reranking=dba))
    expected = database_augmentation(np.concatenate([x, new]), 3, 3.0)[30:]
    got = np.stack([SearchIndex.open(tmp_path / "i").faiss_index.reconstruct(i) for i in range(30, 34)])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_array_equal(SearchIndex.open(tmp_path / "i").descriptors[30:], new)  # as the model gave them


@pytest.mark.parametrize("spec", [IndexSpec("hnsw", hnsw_m=8), IndexSpec("ivfflat", nlist=4, nprobe=4),
                                  IndexSpec("ivfpq", nlist=4, pq_m=4, nprobe=4)])
def test_approximate_kinds_add_and_remove(tmp_path, spec):
    rng = np.random.default_rng(2)
    x = _unit(rng, 300)
    index = SearchIndex.build(str(tmp_path / "i"), x, _images(0, 300), model_identity(_meta()), spec)
    index.add(_unit(rng, 2), _images(300, 2), _meta())
    assert index.remove([0, 301]) == [0, 301]
    index = SearchIndex.open(tmp_path / "i")
    assert index.faiss_index.ntotal == 300 and 0 not in index.entries["faiss_id"].tolist()
    hits = Searcher(index, VectorDescriber(_meta())).search([x[5]], k=5)[0]
    assert hits[0].faiss_id == 5 and all(h.faiss_id != 0 for h in hits)


def test_auto_records_the_kind_it_chose(tmp_path):
    x = _unit(np.random.default_rng(4), 50)
    SearchIndex.build(str(tmp_path / "i"), x, _images(0, 50), model_identity(_meta()), IndexSpec("auto"))
    index = SearchIndex.open(tmp_path / "i")
    assert index.info["spec"]["kind"] == "flat" and index.summary()["kind"] == "flat"


def test_s3_index_round_trip(s3_env, built):
    from components.storage import s3_filesystem

    index, x, rng = built
    s3_filesystem().mkdir("catalog-test")
    remote = SearchIndex.build("s3://catalog-test/index", x, _images(0, 40), model_identity(_meta()))
    remote.add(_unit(rng, 2), _images(40, 2), _meta())
    opened = SearchIndex.open("s3://catalog-test/index/")
    assert opened.info["generation"] == "g000002" and len(opened.entries) == 42
    assert Searcher(opened, VectorDescriber(_meta())).search([x[9]], k=1)[0][0].faiss_id == 9
    assert s3_filesystem().ls("catalog-test/index", detail=False) == ["catalog-test/index/CURRENT",
                                                                    "catalog-test/index/g000002"]


def test_ivfpq_with_refine_ranks_by_the_descriptors(tmp_path):
    """`refine`: the codes shortlist candidates, the stored descriptors score them: hits carry exact scores, in
    the exact order; without it the scores are the codes' approximations."""
    rng = np.random.default_rng(6)
    x = _unit(rng, 300)
    spec = IndexSpec("ivfpq", nlist=4, pq_m=2, nprobe=4)
    for refine in (0, 50):
        index = SearchIndex.build(str(tmp_path / f"r{refine}"), x, _images(0, 300), model_identity(_meta()),
                                  dataclasses.replace(spec, refine=refine))
        hits = Searcher(SearchIndex.open(tmp_path / f"r{refine}"), VectorDescriber(_meta())).search([x[7]], k=5)[0]
        exact = x[[h.faiss_id for h in hits]] @ x[7]
        scores = np.array([h.score for h in hits])
        if refine:
            np.testing.assert_allclose(scores, exact, atol=1e-5)
            assert hits[0].faiss_id == 7 and np.all(np.diff(scores) <= 0)
        else:
            assert np.abs(scores - exact).max() > 1e-3
