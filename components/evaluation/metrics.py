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


def per_query_scores(
    relevant: npt.ArrayLike,
    n_relevant: npt.ArrayLike,
    cmc_ranks: Sequence[int],
    recall_ks: Sequence[int],
) -> dict[str, npt.NDArray[np.float64]]:
    """One score per query (row of `relevant`, ranked best first; R = `n_relevant`, over the whole database).

    "ap":       (1/R) * sum_i P@i * rel(i) over the ranking (same as `average_precision`).
    "map@r":    (1/R) * sum_{i<=R} P@i * rel(i) (mAP@R, Musgrave et al., "A Metric Learning Reality Check").
    "recall@k": 1 when a relevant item is in the top k (the DML-benchmark Recall@K), for k in `recall_ks`.
    "cmc@k":    the same indicator under the re-identification name, for k in `cmc_ranks`.
    """
    rel = np.asarray(relevant, dtype=bool)
    if rel.ndim != 2 or rel.shape[0] == 0 or rel.shape[1] == 0:
        raise ValueError(f"relevant must be 2-D (queries x ranked items) with at least one row and column, got shape {rel.shape}")
    r = np.asarray(n_relevant)
    if r.shape != (rel.shape[0],) or not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"n_relevant must be an integer array of shape ({rel.shape[0]},), got {r.dtype} {r.shape}")
    if (r <= 0).any():
        raise ValueError(f"{int((r <= 0).sum())} queries have n_relevant <= 0; their scores are undefined (R = 0)")
    found = rel.sum(axis=1)
    if (found > r).any():
        q = int(np.flatnonzero(found > r)[0])
        raise ValueError(f"query {q}: n_relevant={int(r[q])} is smaller than the {int(found[q])} relevant items in its ranking")
    bad = [k for k in (*cmc_ranks, *recall_ks) if int(k) < 1]
    if bad:
        raise ValueError(f"ranks must be >= 1, got {bad}")

    rank = np.arange(1, rel.shape[1] + 1)
    precision_at_hits = np.where(rel, np.cumsum(rel, axis=1) / rank, 0.0)
    first_hit = np.where(rel.any(axis=1), rel.argmax(axis=1) + 1, np.inf)
    scores = {
        "ap": precision_at_hits.sum(axis=1) / r,
        "map@r": np.where(rank <= r[:, None], precision_at_hits, 0.0).sum(axis=1) / r,
    }
    scores.update({f"recall@{int(k)}": (first_hit <= k).astype(np.float64) for k in recall_ks})
    scores.update({f"cmc@{int(k)}": (first_hit <= k).astype(np.float64) for k in cmc_ranks})
    return scores


def relevance_from_similarity(
    similarity: npt.ArrayLike,
    query_labels: npt.ArrayLike,
    db_labels: npt.ArrayLike,
    exclude: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """Rank each row of `similarity` (queries x database) by descending similarity, ties by database index.

    Entries where `exclude` is True are dropped from the ranking and from R; every row must exclude the same
    number of entries. Returns (relevant: bool (queries x kept items), n_relevant: non-excluded same-label items).
    """
    sim = np.asarray(similarity, dtype=np.float64)
    q = np.asarray(query_labels)
    db = np.asarray(db_labels)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be 2-D (queries x database), got shape {sim.shape}")
    if q.shape != (sim.shape[0],) or db.shape != (sim.shape[1],):
        raise ValueError(f"labels must have shapes ({sim.shape[0]},) and ({sim.shape[1]},), got {q.shape} and {db.shape}")
    keep = np.ones(sim.shape, dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    if keep.shape != sim.shape:
        raise ValueError(f"exclude must have the similarity's shape {sim.shape}, got {keep.shape}")
    if not np.isfinite(sim[keep]).all():  # excluded entries may be anything (e.g. −inf)
        raise ValueError("similarity holds NaN or infinite values")
    kept = keep.sum(axis=1)
    if sim.shape[0] and (kept != kept[0]).any():
        raise ValueError(f"every row must exclude the same number of entries, got kept counts from {kept.min()} to {kept.max()}")

    same = q[:, None] == db[None, :]
    order = np.argsort(-sim, axis=1, kind="stable")
    keep_sorted = np.take_along_axis(keep, order, axis=1)
    relevant = np.take_along_axis(same, order, axis=1)[keep_sorted].reshape(sim.shape[0], -1)
    return relevant, (same & keep).sum(axis=1).astype(np.int64)


def leave_one_out_ranking(
    descriptors: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """Every item queries all other items by inner product (L2-normalised descriptors), itself excluded.

    Returns (relevant: bool (n, n-1), n_relevant: class size - 1 per item); ties are broken by index.
    """
    x = np.asarray(descriptors, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"descriptors must be 2-D with at least two rows, got shape {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"need one label per descriptor row: labels {y.shape} vs {x.shape[0]} rows")
    classes, counts = np.unique(y, return_counts=True)
    singletons = classes[counts == 1]
    if singletons.size:
        raise ValueError(
            f"class {singletons.tolist()[0]!r} has a single item, so its query has no relevant item"
            + (f" ({singletons.size} such classes)" if singletons.size > 1 else "")
        )
    return relevance_from_similarity(x @ x.T, y, y, exclude=np.eye(x.shape[0], dtype=bool))


def summarise(per_query: dict[str, npt.ArrayLike]) -> dict[str, float]:
    """Mean over queries of each per-query score; "ap" is reported as "map"."""
    if not per_query:
        raise ValueError("no per-query scores to summarise")
    summary = {}
    for key, values in per_query.items():
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 1 or v.size == 0:
            raise ValueError(f"per-query scores {key!r} must be a non-empty 1-D array, got shape {v.shape}")
        summary["map" if key == "ap" else key] = float(v.mean())
    return summary
