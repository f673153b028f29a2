"""Answer image queries from an index with the model that built it: the one search path of the CLI, the HTTP service
and the Ray Serve deployment."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from components.catalog.describe import Describer
from components.catalog.store import FAISS_ID, SearchIndex
from components.data.contract import ID, LABEL, URI
from components.errors import FiresightError
from components.search.index import IndexSpec, refined_search
from components.search.postprocess import _normalise, _weighted_sum
from components.search.rerank import k_reciprocal_distances

K_RECIPROCAL_MAX_ITEMS = 20_000  # dense k-reciprocal re-ranking holds (queries + database)² distances


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float  # cosine similarity (after αQE with --rerank); with k-reciprocal re-ranking, 1 − its distance
    faiss_id: int
    id: str  # the image's sha256
    label: str
    uri: str

    def as_dict(self) -> dict:
        return asdict(self)


class Searcher:
    """An index and a describer of the same model (checked), searching PIL images.

    rerank: apply the query-side re-ranking the model's post-processing chose (αQE over the indexed vectors, or
    k-reciprocal re-ranking against the whole database); database-side augmentation is in the index already.
    """

    def __init__(self, index: SearchIndex, describer: Describer, rerank: bool = False) -> None:
        index.check_model(describer.meta)
        self.index, self.describer, self.rerank = index, describer, rerank
        kr = index.reranking.k_reciprocal
        if rerank and kr is not None and len(index.entries) + 1 > K_RECIPROCAL_MAX_ITEMS:
            raise FiresightError(f"--rerank: k-reciprocal re-ranking is dense and {len(index.entries):,} database "
                                 f"images exceed {K_RECIPROCAL_MAX_ITEMS:,}; search without it")

    def search(self, images: list[Image.Image], k: int, exclude: list[str | None] | None = None) -> list[list[Hit]]:
        """Top-k hits per image, best first. exclude[i]: an image sha256 that query i must not return (the query
        itself when it is in the database)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not images:
            return []
        exclude = exclude or [None] * len(images)
        q = self.describer.describe(images)
        rows, scores = self._ranked(q, k + 1)
        out = []
        for i in range(len(images)):
            hits = []
            for row, score in zip(rows[i], scores[i]):
                if row < 0 or self.index.entries[ID].iat[row] == exclude[i]:
                    continue
                entry = self.index.entries.iloc[row]
                hits.append(Hit(len(hits) + 1, float(score), int(entry[FAISS_ID]), entry[ID], entry[LABEL], entry[URI]))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def _ranked(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(entry rows, scores), (n, ≤ k) each, best first; row −1 where an approximate index found fewer."""
        reranking, n = self.index.reranking, len(self.index.entries)
        if self.rerank and reranking.k_reciprocal is not None:
            kr = reranking.k_reciprocal
            k1 = min(kr.k1, n + len(q) - 1)
            dist = k_reciprocal_distances(q, self.index.descriptors, k1, min(kr.k2, k1), kr.lambda_value)
            order = np.argsort(dist, axis=1, kind="stable")[:, :k]
            return order, 1.0 - np.take_along_axis(dist, order, axis=1)
        if self.rerank and reranking.qe_k:
            scores, ids = self.index.faiss_index.search(q, min(reranking.qe_k, n))
            neighbours = self._searched_vectors(ids)
            q = _normalise(q + _weighted_sum(scores, np.arange(ids.size).reshape(ids.shape), neighbours,
                                             reranking.qe_alpha), fallback=q)
        q = np.ascontiguousarray(q, dtype=np.float32)
        spec = IndexSpec(**self.index.info["spec"])
        if spec.kind == "ivfpq" and spec.refine:  # codes shortlist, the model's descriptors rank (as QE lends them)
            scores, ids = refined_search(self.index.faiss_index, q, min(k, n), spec.refine,
                                         lambda faiss_ids: self.index.descriptors[self.index.rows_of(faiss_ids)])
        else:
            scores, ids = self.index.faiss_index.search(q, min(k, n))
        return self.index.rows_of(ids), scores

    def _searched_vectors(self, ids: np.ndarray) -> np.ndarray:
        """The indexed (DBA-augmented) vectors of faiss ids, flattened; an index that cannot give them back (IVF-PQ)
        lends the model's descriptors instead."""
        flat = ids.ravel()
        try:
            return np.stack([self.index.faiss_index.reconstruct(int(i)) for i in flat])
        except RuntimeError:
            return self.index.descriptors[self.index.rows_of(flat)]
