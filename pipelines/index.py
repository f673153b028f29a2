"""Stage index: embed the test database with the search model (models/search: its resolution, scales and
whitening); write its descriptors, ids and a faiss index of them after the chosen database-side augmentation
(exact by default, `index.kind` for HNSW or IVF-PQ)."""

from __future__ import annotations

import logging

import numpy as np

from components.models.net import load_net
from components.search.embed import embed_images
from components.search.index import IndexSpec, build_index, save_index
from components.search.postprocess import database_augmentation, reranking_of
from components.storage import atomic_write_path, write_json, write_parquet
from components.training.context import BEST_MODEL_FILE
from pipelines._runner import run_stage
from pipelines.common import load_splits, stopwatch
from pipelines.params import IndexParams, Params
from pipelines.paths import INDEX_DIR, METRICS_DIR, SEARCH_DIR

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    with stopwatch() as timing:
        net = load_net(SEARCH_DIR / BEST_MODEL_FILE)
        db = load_splits().test_database()
        _, descriptors = embed_images(net, db["uri"].tolist(), batch_size=params.index.batch_size, progress=True,
                                      desc="index")
        with atomic_write_path(INDEX_DIR / "descriptors.npy") as tmp:
            np.save(tmp, descriptors)  # as the model gives them; the faiss index holds them after DBA
        reranking = reranking_of(net.meta)
        searched = (database_augmentation(descriptors, reranking.dba_k, reranking.dba_alpha) if reranking.dba_k
                    else descriptors)
        write_parquet(INDEX_DIR / "ids.parquet", db[["id", "label"]].reset_index(drop=True))
        save_index(build_index(searched, index_spec(params.index)), INDEX_DIR / "faiss.index")
    log.info("indexed %d test database images (%d-d, %s) in %.1f s", len(db), descriptors.shape[1],
             reranking.describe(), timing["wall_seconds"])
    write_json(METRICS_DIR / "index.json", {"images": len(db), "dim": int(descriptors.shape[1]), **timing})


def index_spec(p: IndexParams) -> IndexSpec:
    return IndexSpec(p.kind, p.hnsw_m, p.ef_construction, p.ef_search, p.nlist, p.pq_m, p.nprobe)


if __name__ == "__main__":
    run_stage("index", main)
