"""Stage index: embed the test database with the search model (models/search: its resolution, scales and
whitening) and write the living index `firesight` searches and grows (components/catalog/store.py): descriptors,
entries with stable ids, and a faiss index of them after the chosen database-side augmentation (exact by default,
`index.kind` for HNSW, IVF-Flat, IVF-PQ, or auto by size). `index.engine: ray` embeds on Ray Data actors (the local
Ray, or the cluster at RAY_ADDRESS); an image they cannot read is named in metrics/index.json, not a lost job."""

from __future__ import annotations

import logging

from components.catalog import indexing
from components.models.net import load_net
from components.search.index import IndexSpec
from components.storage import write_json
from components.training.context import BEST_MODEL_FILE
from pipelines._runner import run_stage
from pipelines.common import load_splits, stopwatch
from pipelines.embedding import database_describer
from pipelines.params import IndexParams, Params
from pipelines.paths import INDEX_DIR, METRICS_DIR, SEARCH_DIR

log = logging.getLogger(__name__)


def main(params: Params) -> None:
    with stopwatch() as timing:
        net = load_net(SEARCH_DIR / BEST_MODEL_FILE)
        db = load_splits().test_database()
        built = indexing.build(str(INDEX_DIR), net, db, index_spec(params.index), params.index.batch_size,
                               describe=database_describer(params))
    index, kind = built.index, built.index.info["spec"]["kind"]
    for bad in built.undescribed:
        log.warning("not indexed: %s: %s", bad["file"], bad["reason"])
    log.info("indexed %d of %d test database images (%d-d, %s index, %s, embedded %s) in %.1f s", index.info["count"],
             len(db), index.model["dim"], kind, index.reranking.describe(), params.index.engine, timing["wall_seconds"])
    write_json(METRICS_DIR / "index.json", {"images": int(index.info["count"]), "dim": int(index.model["dim"]),
                                            "kind": kind, "engine": params.index.engine,
                                            "undescribed": built.undescribed, **timing})


def index_spec(p: IndexParams) -> IndexSpec:
    return IndexSpec(p.kind, p.hnsw_m, p.ef_construction, p.ef_search, p.nlist, p.pq_m, p.nprobe, p.train_sample,
                     p.refine)


if __name__ == "__main__":
    run_stage("index", main)
