"""Descriptor post-processing for search: α-weighted query expansion (αQE) and database-side augmentation (DBA).

Both follow Radenović et al. (2018): a vector is replaced by the normalised weighted sum of itself and its
nearest database neighbours, with weights w = max(sim, 0)^α (α = 0: plain average; large α: dominated by the
most similar). Neighbours come from the exact faiss index of components.search.index.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from components.search.index import build_index, search

_ZERO_NORM = 1e-12


def alpha_query_expansion(
    queries: npt.ArrayLike, database: npt.ArrayLike, k: int, alpha: float
) -> npt.NDArray[np.float32]:
    """q' = (q + Σ_{i≤k} w_i d_i) / ‖·‖ over the top-k database neighbours d_i of q, w_i = max(q·d_i, 0)^α.

    The query enters with weight 1 (= its self-similarity^α); α = 0 is ordinary average query expansion.
    """
    _check_params(k, alpha)
    index = build_index(database)
    scores, indices = search(index, queries, k)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    db = np.ascontiguousarray(database, dtype=np.float32)
    return _normalise(q + _weighted_sum(scores, indices, db, alpha), fallback=q)


def database_augmentation(database: npt.ArrayLike, k: int, alpha: float) -> npt.NDArray[np.float32]:
    """d' = (Σ_{i≤k} w_i d_i) / ‖·‖ over the top-k database neighbours of d, d itself first (w = 1).

    k counts d itself: k = 1 leaves the database unchanged.
    """
    _check_params(k, alpha)
    index = build_index(database)
    db = np.ascontiguousarray(database, dtype=np.float32)
    scores, indices = search(index, db, k)
    return _normalise(_weighted_sum(scores, indices, db, alpha), fallback=db)


def _check_params(k: int, alpha: float) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")


def _weighted_sum(
    scores: npt.NDArray[np.float32], indices: npt.NDArray[np.int64], database: npt.NDArray[np.float32], alpha: float
) -> npt.NDArray[np.float32]:
    weights = np.maximum(scores, 0.0) ** alpha  # 0^0 = 1: α = 0 weighs every neighbour equally
    return np.einsum("nk,nkd->nd", weights, database[indices]).astype(np.float32)


def _normalise(x: npt.NDArray[np.float32], fallback: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Rows of x scaled to unit length; a row that sums to zero keeps its original vector."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norms > _ZERO_NORM, x / np.maximum(norms, _ZERO_NORM), fallback).astype(np.float32)
