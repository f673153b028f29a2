"""Retrieval metrics (mAP, CMC) and positive/negative pair-distance statistics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def average_precision(relevant: npt.ArrayLike, n_relevant: int | None = None) -> float:
    """Non-interpolated average precision of one ranked list (the AP we publish).

    AP = (1/R) * sum_k P@k * rel(k), where rel(k) is 1 when the item at rank k (1-based) is relevant,
    P@k is the fraction of relevant items among the top k, and R is the number of relevant items in the
    whole database (`n_relevant`; defaults to `relevant.sum()`, i.e. the ranking covers the database).
    Relevant items missing from a truncated ranking contribute 0. Over a full ranking without ties this
    equals sklearn's `average_precision_score`. R = 0 has no defined AP and raises ValueError.
    """
    rel = np.asarray(relevant, dtype=bool)
    if rel.ndim != 1:
        raise ValueError(f"relevant must be a 1-D ranked list, got shape {rel.shape}")
    found = int(rel.sum())
    r = found if n_relevant is None else int(n_relevant)
    if r <= 0:
        raise ValueError("average precision is undefined for a query with no relevant item (R = 0)")
    if found > r:
        raise ValueError(f"n_relevant={r} is smaller than the {found} relevant items in the ranking")
    hit_ranks = np.flatnonzero(rel) + 1
    precision_at_hits = np.arange(1, found + 1) / hit_ranks
    return float(precision_at_hits.sum() / r)


def cmc(relevant_matrix: npt.ArrayLike, ranks: Sequence[int]) -> dict[int, float]:
    """Cumulative match characteristic: fraction of queries (rows, ranked) with a relevant item in the top k, per k."""
    rel = np.asarray(relevant_matrix, dtype=bool)
    if rel.ndim != 2 or rel.shape[0] == 0:
        raise ValueError(f"relevant_matrix must be 2-D (queries x ranked items) with at least one row, got shape {rel.shape}")
    bad = [k for k in ranks if int(k) < 1]
    if bad:
        raise ValueError(f"CMC ranks must be >= 1, got {bad}")
    first_hit = np.where(rel.any(axis=1), rel.argmax(axis=1) + 1, np.inf)
    return {int(k): float(np.mean(first_hit <= k)) for k in ranks}


def evaluate_rankings(
    query_labels: npt.ArrayLike,
    db_labels: npt.ArrayLike,
    ranking: npt.ArrayLike,
    ranks: Sequence[int] = (1, 5, 10),
) -> dict[str, float | int]:
    """mAP and CMC@k of `ranking` (queries x items, indices into the database, best first).

    An item is relevant when its label equals the query's; R per query is counted over the whole
    database, so a truncated ranking is scored honestly. Returns keys "map", "cmc@k" for each k,
    "queries" and "database".
    """
    q = np.asarray(query_labels)
    db = np.asarray(db_labels)
    order = np.asarray(ranking)
    if q.ndim != 1 or db.ndim != 1:
        raise ValueError(f"labels must be 1-D, got query {q.shape} and database {db.shape}")
    if order.ndim != 2 or order.shape[0] != q.shape[0]:
        raise ValueError(f"ranking must have shape ({q.shape[0]}, n), got {order.shape}")
    if not np.issubdtype(order.dtype, np.integer):
        raise ValueError(f"ranking must hold integer database indices, got dtype {order.dtype}")
    if order.shape[1] > db.shape[0]:
        raise ValueError(f"ranking has {order.shape[1]} columns but the database holds only {db.shape[0]} items")
    if order.size and (order.min() < 0 or order.max() >= db.shape[0]):
        raise ValueError(f"ranking indices must lie in [0, {db.shape[0]})")
    if order.shape[1] > 1 and (np.diff(np.sort(order, axis=1), axis=1) == 0).any():
        raise ValueError("a ranking row lists the same database item more than once")
    if q.shape[0] == 0:
        raise ValueError("no queries to evaluate")

    classes, counts = np.unique(db, return_counts=True)
    pos = np.clip(np.searchsorted(classes, q), 0, len(classes) - 1)
    n_relevant = np.where(classes[pos] == q, counts[pos], 0)
    orphans = int((n_relevant == 0).sum())
    if orphans:
        raise ValueError(f"{orphans} of {q.shape[0]} queries have no relevant item in the database; mAP is undefined for them")

    rel = db[order] == q[:, None]
    aps = [average_precision(row, int(r)) for row, r in zip(rel, n_relevant, strict=True)]
    result: dict[str, float | int] = {"map": float(np.mean(aps))}
    result.update({f"cmc@{k}": v for k, v in cmc(rel, ranks).items()})
    result["queries"] = int(q.shape[0])
    result["database"] = int(db.shape[0])
    return result


def pair_distances(
    query_desc: npt.ArrayLike,
    query_labels: npt.ArrayLike,
    db_desc: npt.ArrayLike,
    db_labels: npt.ArrayLike,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Euclidean distances of all query-database pairs, split into (same-class, different-class) 1-D arrays."""
    qx = np.asarray(query_desc, dtype=np.float64)
    dx = np.asarray(db_desc, dtype=np.float64)
    ql = np.asarray(query_labels)
    dl = np.asarray(db_labels)
    if qx.ndim != 2 or dx.ndim != 2 or qx.shape[1] != dx.shape[1]:
        raise ValueError(f"descriptors must be 2-D with the same width, got query {qx.shape} and database {dx.shape}")
    if ql.shape != (qx.shape[0],) or dl.shape != (dx.shape[0],):
        raise ValueError(
            f"need one label per descriptor row: query labels {ql.shape} vs {qx.shape[0]} rows, "
            f"database labels {dl.shape} vs {dx.shape[0]} rows"
        )
    sq = (qx**2).sum(axis=1)[:, None] + (dx**2).sum(axis=1)[None, :] - 2.0 * qx @ dx.T
    dist = np.sqrt(np.maximum(sq, 0.0))
    same = ql[:, None] == dl[None, :]
    return dist[same], dist[~same]


def distance_summary(pos: npt.ArrayLike, neg: npt.ArrayLike) -> dict[str, float]:
    """Mean/std of positive and negative pair distances, and `overlap`: fraction of negatives closer than the median positive."""
    p = np.asarray(pos, dtype=np.float64).ravel()
    n = np.asarray(neg, dtype=np.float64).ravel()
    if p.size == 0 or n.size == 0:
        raise ValueError(f"need at least one positive and one negative distance, got {p.size} and {n.size}")
    return {
        "pos_mean": float(p.mean()),
        "pos_std": float(p.std()),
        "neg_mean": float(n.mean()),
        "neg_std": float(n.std()),
        "overlap": float(np.mean(n < np.median(p))),
    }
