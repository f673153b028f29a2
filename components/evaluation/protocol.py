"""The test protocol shared by the evaluate stage and the ablation: rank a database for each query, score it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from components.evaluation.metrics import evaluate_rankings
from components.search.index import build_index, search
from components.search.postprocess import alpha_query_expansion


def score_queries(
    query_desc: np.ndarray,
    query_labels: Sequence,
    db_desc: np.ndarray,
    db_labels: Sequence,
    *,
    ranks: Sequence[int] = (1, 5, 10),
    qe_k: int = 0,
    qe_alpha: float = 3.0,
) -> tuple[dict, np.ndarray]:
    """mAP and CMC@ranks of the queries against the whole database, ranked exactly (after αQE when qe_k > 0).

    Returns the metrics and the (possibly expanded) query descriptors that were searched.
    """
    if qe_k:
        query_desc = alpha_query_expansion(query_desc, db_desc, qe_k, qe_alpha)
    _, ranking = search(build_index(db_desc), query_desc, k=len(db_desc))
    return evaluate_rankings(np.asarray(query_labels), np.asarray(db_labels), ranking, ranks), query_desc
