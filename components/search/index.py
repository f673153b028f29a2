"""Cosine-similarity search over L2-normalised float32 descriptors with faiss: exact (flat, the default) or
approximate (an HNSW graph, or IVF-PQ: an inverted file of product-quantised codes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import numpy.typing as npt

from components.storage import atomic_write_path

_NORM_TOLERANCE = 1e-3


def _check_unit_rows(x: npt.ArrayLike, name: str) -> npt.NDArray[np.float32]:
    """Return `x` as a C-contiguous float32 matrix, or raise ValueError if it is not a stack of unit-norm finite rows."""
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (rows x dims), got shape {arr.shape}")
    if arr.dtype != np.float32 or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    squared = np.einsum("ij,ij->i", arr, arr)  # no n x d temporary: 1M x 1280 rows check in ~0.5 s
    low, high = (1.0 - _NORM_TOLERANCE) ** 2, (1.0 + _NORM_TOLERANCE) ** 2
    if ((squared >= low) & (squared <= high)).all():  # the common case in few operations (NaN fails both)
        return arr
    norms = np.sqrt(squared)
    finite = np.isfinite(norms)  # a NaN or infinite entry makes its row's norm non-finite
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise ValueError(f"{name}: {rows.size} row(s) hold NaN or infinite values (first: row {rows[0]})")
    off = np.abs(norms - 1.0) > _NORM_TOLERANCE
    if off.any():
        rows = np.flatnonzero(off)
        raise ValueError(
            f"{name}: {rows.size} row(s) are not L2-normalised (row {rows[0]} has norm {norms[rows[0]]:.4f}; "
            f"expected 1 +/- {_NORM_TOLERANCE})"
        )
    return arr


@dataclass(frozen=True)
class IndexSpec:
    """Which inner-product index to build, with its build and search parameters.

    flat: exact. hnsw: graph of `hnsw_m` links per node, built with `ef_construction` candidates, searched with
    `ef_search`. ivfpq: `nlist` k-means cells of `pq_m`-byte product-quantised codes, `nprobe` cells searched.
    The search parameters are stored in the index file.
    """

    kind: Literal["flat", "hnsw", "ivfpq"] = "flat"
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    nlist: int = 1024
    pq_m: int = 32
    nprobe: int = 16

    def factory(self) -> str:
        """The faiss.index_factory string."""
        # "np": no polysemous training, which faiss otherwise runs for 8-bit PQ (minutes, unused by the search)
        return {"flat": "Flat", "hnsw": f"HNSW{self.hnsw_m}", "ivfpq": f"IVF{self.nlist},PQ{self.pq_m}np"}[self.kind]


_PQ_CENTROIDS = 256  # 8-bit codes: each sub-quantiser is trained with k-means into 256 centroids


def build_index(descriptors: npt.ArrayLike, spec: IndexSpec = IndexSpec()) -> faiss.Index:
    """An inner-product index of `spec` over unit-norm rows (scores are cosine similarities); IVF-PQ is trained
    on the rows themselves (faiss samples at most 256 per centroid)."""
    x = _check_unit_rows(descriptors, "descriptors")
    n, d = x.shape
    if spec.kind == "ivfpq":
        if d % spec.pq_m:
            raise ValueError(f"IVF-PQ: pq_m={spec.pq_m} must divide the descriptor dimension {d}")
        if n < max(spec.nlist, _PQ_CENTROIDS):
            raise ValueError(f"IVF-PQ: training needs at least max(nlist={spec.nlist}, {_PQ_CENTROIDS}) rows, got {n}")
    index = faiss.index_factory(d, spec.factory(), faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        index.hnsw.efConstruction = spec.ef_construction
    if not index.is_trained:
        index.train(x)
    index.add(x)
    set_search_parameters(index, spec)
    return index


def set_search_parameters(index: faiss.Index, spec: IndexSpec) -> None:
    """Set efSearch (HNSW) or nprobe (IVF) of `index` from `spec`; an exact index has none."""
    if spec.kind == "hnsw":
        index.hnsw.efSearch = spec.ef_search
    elif spec.kind == "ivfpq":
        index.nprobe = spec.nprobe


def save_index(index: faiss.Index, path: Path) -> None:
    """Write `index` to `path` atomically."""
    with atomic_write_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: Path) -> faiss.Index:
    """Read a faiss index written by `save_index`; FileNotFoundError naming the path if it is absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such faiss index file (build it with the index stage first)")
    return faiss.read_index(str(path))


def search(
    index: faiss.Index, queries: npt.ArrayLike, k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top-k (clipped to the index size) scores and database indices per query row, best first. An approximate
    index may find fewer than k: the rest of the row is index -1."""
    if index.ntotal == 0:
        raise ValueError("the index is empty")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = _check_unit_rows(queries, "queries")
    if q.shape[1] != index.d:
        raise ValueError(f"queries have {q.shape[1]} dims but the index holds {index.d}-dim descriptors")
    scores, indices = index.search(q, min(int(k), index.ntotal))
    return scores, indices


def l2_distance_from_ip(scores: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Euclidean distance of unit vectors from their inner product: sqrt(max(0, 2 - 2*s))."""
    s = np.asarray(scores, dtype=np.float32)
    return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * s)).astype(np.float32)
