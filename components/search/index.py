"""Exact cosine-similarity search over L2-normalised float32 descriptors with faiss."""

from __future__ import annotations

from pathlib import Path

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
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise ValueError(f"{name}: {rows.size} row(s) hold NaN or infinite values (first: row {rows[0]})")
    norms = np.linalg.norm(arr, axis=1)
    off = np.abs(norms - 1.0) > _NORM_TOLERANCE
    if off.any():
        rows = np.flatnonzero(off)
        raise ValueError(
            f"{name}: {rows.size} row(s) are not L2-normalised (row {rows[0]} has norm {norms[rows[0]]:.4f}; "
            f"expected 1 +/- {_NORM_TOLERANCE})"
        )
    return arr


def build_index(descriptors: npt.ArrayLike) -> faiss.Index:
    """Exact inner-product index (IndexFlatIP) over unit-norm rows; scores are cosine similarities."""
    x = _check_unit_rows(descriptors, "descriptors")
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


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
    """Top-k (clipped to the index size) scores and database indices per query row, best first."""
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
