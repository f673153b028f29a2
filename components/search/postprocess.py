"""Descriptor post-processing for search: α-weighted query expansion (αQE) and database-side augmentation (DBA).

Both follow Radenović et al. (2018): a vector is replaced by the normalised weighted sum of itself and its
nearest database neighbours, with weights w = max(sim, 0)^α (α = 0: plain average; large α: dominated by the
most similar). Neighbours come from the exact faiss index of components.search.index; `reranked_similarities`
is the dense form the evaluation ranks with (DBA, then αQE or k-reciprocal re-ranking, optionally leave-one-out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from components.search.index import build_index, search
from components.search.rerank import k_reciprocal_distances, k_reciprocal_distances_self

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


@dataclass(frozen=True)
class KReciprocal:
    """k-reciprocal re-ranking settings (Zhong et al. 2017): components.search.rerank."""

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3


@dataclass(frozen=True)
class Reranking:
    """What happens between the descriptors and the ranking: DBA of the database, then αQE of the queries; or, in
    their place, k-reciprocal re-ranking (its local query expansion augments queries and database alike)."""

    dba_k: int = 0
    dba_alpha: float = 3.0
    qe_k: int = 0
    qe_alpha: float = 3.0
    k_reciprocal: KReciprocal | None = None

    def __post_init__(self) -> None:
        if (self.qe_k or self.dba_k) and self.k_reciprocal is not None:
            raise ValueError("k-reciprocal re-ranking replaces DBA and αQE (it expands queries and the database itself)")
        for k, alpha in ((self.dba_k, self.dba_alpha), (self.qe_k, self.qe_alpha)):
            if k:
                _check_params(k, alpha)

    def describe(self) -> str:
        parts = [f"DBA k={self.dba_k} α={self.dba_alpha:g}"] if self.dba_k else []
        parts += [f"αQE k={self.qe_k} α={self.qe_alpha:g}"] if self.qe_k else []
        if self.k_reciprocal is not None:
            kr = self.k_reciprocal
            parts.append(f"k-reciprocal k1={kr.k1} k2={kr.k2} λ={kr.lambda_value:g}")
        return ", ".join(parts) or "none"


def reranked_similarities(queries: npt.ArrayLike, database: npt.ArrayLike, reranking: Reranking,
                          leave_one_out: bool = False) -> npt.NDArray[np.float32]:
    """Dense (queries x database) similarities after `reranking` (higher is better): the evaluation's ranking.

    leave_one_out: the queries ARE the database (same rows, same order), and query i is scored as a new image would
    be: its own entry gets −inf, its αQE neighbours are the others, and the database is augmented as if i were not
    in it (i is dropped from every item's DBA sum, which then has one neighbour fewer). k-reciprocal re-ranking
    puts each query into the others' neighbourhood graph, as it does any query.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    db = np.ascontiguousarray(database, dtype=np.float32)
    if leave_one_out and q.shape != db.shape:
        raise ValueError(f"leave-one-out needs the queries to be the database, got {q.shape} and {db.shape}")
    excluded = np.eye(len(q), dtype=bool) if leave_one_out else None
    if reranking.k_reciprocal is not None:
        kr = reranking.k_reciprocal
        dist = (k_reciprocal_distances_self(db, kr.k1, kr.k2, kr.lambda_value) if leave_one_out
                else k_reciprocal_distances(q, db, kr.k1, kr.k2, kr.lambda_value))
        return _masked(-dist, excluded)
    if leave_one_out and reranking.dba_k:
        return _leave_one_out_augmented(db, reranking)
    if reranking.dba_k:  # not leave-one-out: the index stage's own DBA and αQE
        db = database_augmentation(db, reranking.dba_k, reranking.dba_alpha)
    if reranking.qe_k and not leave_one_out:
        q = alpha_query_expansion(q, db, reranking.qe_k, reranking.qe_alpha)
    sim = _masked(q @ db.T, excluded)
    if reranking.qe_k and leave_one_out:  # each query expanded over the others only
        scores, indices = _top_k(sim, reranking.qe_k)
        q = _normalise(q + _weighted_sum(scores, indices, db, reranking.qe_alpha), fallback=q)
        sim = _masked(q @ db.T, excluded)
    return sim


def _leave_one_out_augmented(x: npt.NDArray[np.float32], reranking: Reranking) -> npt.NDArray[np.float32]:
    """Leave-one-out similarities with DBA (then αQE) where query i is left out of the database's augmentation.

    With W the DBA weights (W[j, j] = 1, W[j, k] = w_jk for j's k − 1 neighbours) and s_j = Σ_k W[j, k] x_k, item j
    seen by query i is d_j = (s_j − W[j, i] x_i) / ν_ij. Everything follows from P = X Sᵀ and G = S Sᵀ:
    x_i · d_m = (P[i, m] − W[m, i]) / ν_im with ν_im² = G[m, m] − 2 W[m, i] P[i, m] + W[m, i]², and
    d_j · d_m = (G[j, m] − W[m, i] P[i, j] − W[j, i] P[i, m] + W[j, i] W[m, i]) / (ν_ij ν_im).
    """
    n, eye = len(x), np.eye(len(x), dtype=bool)
    x64 = x.astype(np.float64)
    scores, indices = _top_k(_masked(x @ x.T, eye), reranking.dba_k - 1)
    weights = np.zeros((n, n))
    np.put_along_axis(weights, indices, np.maximum(scores, 0.0).astype(np.float64) ** reranking.dba_alpha, axis=1)
    weights[eye] = 1.0
    s = weights @ x64
    p = x64 @ s.T
    wt = weights.T  # wt[i, m]: the weight of item i in item m's sum
    norms = np.sqrt(np.maximum(np.einsum("md,md->m", s, s)[None, :] - 2 * wt * p + wt**2, _ZERO_NORM))
    sim = (p - wt) / norms
    sim[eye] = -np.inf
    if not reranking.qe_k:
        return sim.astype(np.float32)
    g = s @ s.T
    top_scores, top = _top_k(sim, reranking.qe_k)
    qe_weights = np.maximum(top_scores, 0.0) ** reranking.qe_alpha
    out = np.empty_like(sim)
    for i in range(n):
        j = top[i]
        dots = (g[j] - wt[i][None, :] * p[i, j][:, None] - wt[i, j][:, None] * p[i][None, :]
                + wt[i, j][:, None] * wt[i][None, :]) / (norms[i, j][:, None] * norms[i][None, :])
        w = qe_weights[i]
        expanded = sim[i] + w @ dots  # q'·d_m, q' = x_i + Σ_j w_j d_j (unnormalised)
        length = np.sqrt(max(1.0 + 2.0 * w @ sim[i, j] + w @ dots[:, j] @ w, _ZERO_NORM))
        out[i] = expanded / length
    out[eye] = -np.inf
    return out.astype(np.float32)


def _masked(sim: npt.NDArray[np.float32], excluded: npt.NDArray[np.bool_] | None) -> npt.NDArray[np.float32]:
    sim = sim.astype(np.float32, copy=True)
    if excluded is not None:
        sim[excluded] = -np.inf
    return sim


def _top_k(sim: npt.NDArray[np.float32], k: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The k most similar columns per row, best first (stable: ties by column index); −inf entries never chosen."""
    k = min(k, sim.shape[1] - int(np.isneginf(sim).sum(axis=1).max(initial=0)))
    if k <= 0:
        return np.zeros((len(sim), 0), dtype=np.float32), np.zeros((len(sim), 0), dtype=np.int64)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, order, axis=1), order


def reranking_of(meta: dict) -> Reranking:
    """The reranking a search model's meta records (the postprocess stage's choice); none for any other network."""
    r = dict(meta.get("reranking") or {})
    kr = r.pop("k_reciprocal", None)
    return Reranking(**r, k_reciprocal=KReciprocal(**kr) if kr else None)
