"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, CVPR 2017: "Re-ranking Person Re-identification with k-reciprocal
Encoding"), dense numpy over the N items of queries and database together.

For L2-normalised x, the original distance d(p, g) = ‖x_p − x_g‖² = 2 − 2 x_p·x_g, divided by the largest
distance of p's row. N(p, k) is p and its k nearest items, R(p, k) = {g ∈ N(p, k) : p ∈ N(g, k)} the k-reciprocal
neighbours, and R*(p, k1) = R(p, k1) ∪ R(q, ⌊k1/2⌋) over the q ∈ R(p, k1) with
|R(p, k1) ∩ R(q, ⌊k1/2⌋)| > ⅔ |R(q, ⌊k1/2⌋)|. V_p,g = exp(−d(p, g)) / Σ_{g'∈R*} exp(−d(p, g')) on g ∈ R*(p, k1),
0 elsewhere; local query expansion replaces V_p by the mean of V_g over the k2 items of N(p, k2 − 1) (k2 = 1:
none). Then d_J(p, g) = 1 − Σ_i min(V_p,i, V_g,i) / Σ_i max(V_p,i, V_g,i) and d*(p, g) = (1 − λ) d_J + λ d(p, g).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from components.search.index import _check_unit_rows

_PAIR_CHUNK = 1 << 22  # (query entry, database entry) pairs per accumulation step of the Jaccard min-sums


def k_reciprocal_distances(
    queries: npt.ArrayLike, database: npt.ArrayLike, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> npt.NDArray[np.float32]:
    """Re-ranked distances d* (nq, ndb) of queries (nq, d) to database (ndb, d), smaller is better.

    Neighbourhoods are taken over all nq + ndb items, queries included (as in the paper).
    """
    q = _check_unit_rows(queries, "queries")
    db = _check_unit_rows(database, "database")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"queries and database must have the same dimension, got {q.shape[1]} and {db.shape[1]}")
    n = len(q) + len(db)
    _check_params(k1, k2, lambda_value, n)
    return _rerank(np.concatenate([q, db]), np.arange(len(q)), np.arange(len(q), n), k1, k2, lambda_value)


def k_reciprocal_distances_self(
    descriptors: npt.ArrayLike, k1: int = 20, k2: int = 6, lambda_value: float = 0.3
) -> npt.NDArray[np.float32]:
    """Leave-one-out: every one of the n items queries all the others; d* (n, n) with +inf on the diagonal.

    Neighbourhoods are taken over the n items once (no item is duplicated as a query), so row i equals
    `k_reciprocal_distances(x[i:i+1], x without row i, ...)` up to the item order.
    """
    x = _check_unit_rows(descriptors, "descriptors")
    _check_params(k1, k2, lambda_value, len(x))
    everyone = np.arange(len(x))
    dist = _rerank(x, everyone, everyone, k1, k2, lambda_value)
    np.fill_diagonal(dist, np.inf)
    return dist


def _check_params(k1: int, k2: int, lambda_value: float, n: int) -> None:
    for name, k in (("k1", k1), ("k2", k2)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {k!r}")
    if k2 > k1:
        raise ValueError(f"k2 must be <= k1, got k2={k2} > k1={k1}")
    if k1 >= n:
        raise ValueError(f"k1 must be smaller than the number of items ({n}), got {k1}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}")


def _rerank(
    x: npt.NDArray[np.float32], queries: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lambda_value: float
) -> npt.NDArray[np.float32]:
    """d* between the rows `queries` and `gallery` of x (N, d), neighbourhoods over all N rows."""
    n = len(x)
    dist = np.maximum(2.0 - 2.0 * (x.astype(np.float64) @ x.T.astype(np.float64)), 0.0)
    np.fill_diagonal(dist, 0.0)
    dist /= np.maximum(dist.max(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    rank = _nearest(dist, k1 + 1)  # N(p, k1), nearest first

    forward, mask = _reciprocal(rank, k1)
    half_forward, half_mask = _reciprocal(rank, k1 // 2)
    p, t = np.nonzero(mask)  # the pairs (p, q) with q = forward[p, t] ∈ R(p, k1)
    cand = forward[p, t]
    reciprocal = np.zeros((n, n), dtype=bool)  # R(p, k1) as dense rows
    reciprocal[p, cand] = True
    cand_half, cand_mask = half_forward[cand], half_mask[cand]  # R(q, ⌊k1/2⌋) as masked rows
    accept = (reciprocal[p[:, None], cand_half] & cand_mask).sum(axis=1) > 2.0 / 3.0 * cand_mask.sum(axis=1)
    expanded = reciprocal.copy()  # R*(p, k1)
    add_half, add_mask = cand_half[accept], cand_mask[accept]
    expanded[np.broadcast_to(p[accept, None], add_half.shape)[add_mask], add_half[add_mask]] = True
    np.fill_diagonal(expanded, True)  # p ∈ R*(p) even among exact duplicates

    # V as sparse rows: R* keeps O(k1) entries a row, so V never needs to be dense
    rows, cols = np.nonzero(expanded)  # row-major: grouped by row
    weights = np.exp(-dist[rows, cols])
    vals = weights / np.bincount(rows, weights, n)[rows]
    row_start, row_len = np.searchsorted(rows, np.arange(n)), np.bincount(rows, minlength=n)
    # local query expansion V'_p = (1/k2) Σ_{g ∈ N(p, k2 − 1)} V_g: duplicates (p, i) summed, grouped by column i
    sources = rank[:, :k2].ravel()
    picked = _segments(row_start[sources], row_len[sources])
    targets = np.repeat(np.arange(n).repeat(k2), row_len[sources])
    keys, inverse = np.unique(cols[picked] * n + targets, return_inverse=True)
    qe_vals = np.bincount(inverse, vals[picked] / k2)
    qe_cols, qe_rows = np.divmod(keys, n)

    min_sum = _min_sums(qe_cols, qe_rows, qe_vals, n, queries, gallery)
    sums = np.bincount(qe_rows, qe_vals, n)
    jaccard = 1.0 - min_sum / (sums[queries, None] + sums[None, gallery] - min_sum)  # Σ max = Σ a + Σ b − Σ min
    return ((1.0 - lambda_value) * jaccard + lambda_value * dist[np.ix_(queries, gallery)]).astype(np.float32)


def _nearest(dist: np.ndarray, k: int) -> np.ndarray:
    """The k smallest columns of each row, ascending, ties by column index (except which ties make the cut)."""
    part = np.sort(np.argpartition(dist, k - 1, axis=1)[:, :k], axis=1)
    return np.take_along_axis(part, np.argsort(np.take_along_axis(dist, part, axis=1), axis=1, kind="stable"), axis=1)


def _reciprocal(rank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """N(·, k) as rows (N, k + 1) of `rank`, and the mask (N, k + 1) of those in R(·, k): p ∈ N(g, k) too."""
    n = len(rank)
    forward = rank[:, : k + 1]
    neighbours = np.zeros((n, n), dtype=bool)
    neighbours[np.arange(n)[:, None], forward] = True
    return forward, neighbours[forward, np.arange(n)[:, None]]


def _min_sums(
    cols: np.ndarray, rows: np.ndarray, vals: np.ndarray, n: int, queries: np.ndarray, gallery: np.ndarray
) -> np.ndarray:
    """Σ_i min(V[q, i], V[g, i]) for q ∈ queries, g ∈ gallery, V (n, n) given by its non-zero entries sorted by column.

    For each column i, every non-zero query entry meets every non-zero gallery entry of that column, so the work
    is Σ_i nnz_q(i)·nnz_g(i), not nq·ng·n.
    """
    q_pos, g_pos = np.full(n, -1), np.full(n, -1)
    q_pos[queries], g_pos[gallery] = np.arange(len(queries)), np.arange(len(gallery))
    in_q, in_g = q_pos[rows] >= 0, g_pos[rows] >= 0
    q_cols, q_rows, q_vals = cols[in_q], q_pos[rows[in_q]], vals[in_q]
    g_cols, g_rows, g_vals = cols[in_g], g_pos[rows[in_g]], vals[in_g]
    g_start = np.searchsorted(g_cols, np.arange(n))
    meets = np.bincount(g_cols, minlength=n)[q_cols]  # gallery entries each query entry meets
    ng = len(gallery)
    out = np.zeros(len(queries) * ng)
    ends = np.cumsum(meets)
    start = 0
    while start < len(meets):  # chunks of query entries meeting at most _PAIR_CHUNK gallery entries (or just one)
        stop = max(start + 1, int(np.searchsorted(ends, ends[start] - meets[start] + _PAIR_CHUNK, side="right")))
        first = np.repeat(np.arange(start, stop), meets[start:stop])
        second = _segments(g_start[q_cols[start:stop]], meets[start:stop])
        out += np.bincount(q_rows[first] * ng + g_rows[second], np.minimum(q_vals[first], g_vals[second]), out.size)
        start = stop
    return out.reshape(len(queries), ng)


def _segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(s, s + l) over (s, l) in zip(starts, lengths)."""
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))
