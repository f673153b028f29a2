"""Stage index: embed the test database with the best retrieval model; write descriptors, ids and a faiss index
(exact by default, `index.kind` for HNSW or IVF-PQ)."""

from __future__ import annotations

import logging

import numpy as np

from components.models.net import load_net
from components.search.embed import embed_images
from components.search.index import IndexSpec, build_index, save_index
from components.search.postprocess import database_augmentation
from components.storage import atomic_write_path, write_json, write_parquet
from components.training.context import BEST_MODEL_FILE
from pipelines._runner import run_stage
from pipelines.common import load_splits, stopwatch
from pipelines.params import IndexParams, Params
from pipelines.paths import INDEX_DIR, METRICS_DIR, RETRIEVAL_DIR

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    with stopwatch() as timing:
        net = load_net(RETRIEVAL_DIR / BEST_MODEL_FILE)
        db = load_splits().test_database()
        _, descriptors = embed_images(net, db["uri"].tolist(), batch_size=params.index.batch_size,
                                      image_size=params.model.image_size, progress=True, desc="index")
        if params.index.dba_k:
            descriptors = database_augmentation(descriptors, params.index.dba_k, params.index.dba_alpha)
        with atomic_write_path(INDEX_DIR / "descriptors.npy") as tmp:
            np.save(tmp, descriptors)
        write_parquet(INDEX_DIR / "ids.parquet", db[["id", "label"]].reset_index(drop=True))
        save_index(build_index(descriptors, index_spec(params.index)), INDEX_DIR / "faiss.index")
    log.info("indexed %d test database images (%d-d) in %.1f s", len(db), descriptors.shape[1], timing["wall_seconds"])
    write_json(METRICS_DIR / "index.json", {"images": len(db), "dim": int(descriptors.shape[1]), **timing})


def index_spec(p: IndexParams) -> IndexSpec:
    return IndexSpec(p.kind, p.hnsw_m, p.ef_construction, p.ef_search, p.nlist, p.pq_m, p.nprobe)


if __name__ == "__main__":
    run_stage("index", main)
