"""Embedding a stage's database as the index stage does (`index.engine`: in process, or on Ray Data actors), and
scoring the test protocols on it — what the index and evaluate stages and the ablation share."""

from __future__ import annotations

import numpy as np

from components.catalog import indexing
from components.data.contract import LABEL, URI, Splits
from components.distributed import ensure_ray, gpu_available
from components.errors import DataError
from components.evaluation.protocol import Figures, Scores, score_test
from components.models.net import RetrievalNet
from components.search.postprocess import reranking_of
from components.search.ray_embed import ray_describer
from pipelines.params import Params


def database_describer(params: Params) -> indexing.Describe:
    """How the stages embed a database (index.engine): in this process, or on `index.actors` Ray Data actors (the
    local Ray, or the cluster at ray.address / RAY_ADDRESS)."""
    if params.index.engine == "local":
        return indexing.describe_in_process
    ensure_ray(params.ray.address)
    return ray_describer(actors=params.index.actors, cpus_per_actor=params.ray.cpus_per_worker,
                         use_gpu=gpu_available(params.ray.use_gpu))


def embed_all(net: RetrievalNet, uris: list[str], params: Params, what: str) -> np.ndarray:
    """Descriptors of every one of `uris` (images that passed ingest), embedded as the index stage embeds; a
    DataError naming the images that could not be read."""
    try:
        descriptors, errors = database_describer(params)(net, uris, params.index.batch_size)
    except DataError as e:  # the in-process path stops at the first one
        raise DataError(f"{what}: {e}") from None
    if errors:
        named = "; ".join(f"{uris[i]}: {why}" for i, why in sorted(errors.items())[:3])
        raise DataError(f"{what}: {len(errors)} image(s) could not be described ({named}"
                        f"{'; ...' if len(errors) > 3 else ''}); run the ingest stage again")
    return descriptors


def embed_test(net: RetrievalNet, splits: Splits, params: Params, what: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The test queries' and the test database's descriptors (`Splits` order), embedded as `net`'s meta says (a search
    model's resolution and scales, else model.image_size), in one pass (`embed_all`)."""
    queries, db = splits.test_queries()[URI].tolist(), splits.test_database()[URI].tolist()
    descriptors = embed_all(net, queries + db, params, f"{what}: test images")
    return descriptors[:len(queries)], descriptors[len(queries):]


def test_scores(net: RetrievalNet, splits: Splits, params: Params, what: str = "test",
                descriptors: tuple[np.ndarray, np.ndarray] | None = None) -> Scores:
    """Both test protocols for `net`, ranked with its meta's reranking: per-query scores, for CIs. `descriptors`:
    the (queries, database) descriptors when they are at hand (else `embed_test`)."""
    q_desc, db_desc = descriptors if descriptors is not None else embed_test(net, splits, params, what)
    return score_test(q_desc, splits.test_queries()[LABEL], db_desc, splits.test_database()[LABEL],
                      reranking_of(net.meta), Figures(params.evaluate.cmc_ranks, params.evaluate.recall_ks))
