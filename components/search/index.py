"""Cosine-similarity search over L2-normalised float32 descriptors with faiss: exact (flat, the default) or
approximate (an HNSW graph; an inverted file of exact vectors, IVF-Flat, or of product-quantised codes, IVF-PQ).
An index is built shard by shard: only one shard and the quantiser's training sample are ever in memory, so a
database of memory-mapped descriptor files larger than RAM can be indexed with IVF-PQ, whose coarse codes can be
re-scored exactly against those files at search time (`refined_search`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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


Kind = Literal["flat", "hnsw", "ivfflat", "ivfpq"]
EXACT_UP_TO = 100_000  # `auto`: exact search up to this many rows (~25 q/s per 1k queries per core at 1280-d)
VECTORS_UP_TO_MIB = 8192  # `auto`: beyond exact, an HNSW graph while the float32 vectors fit this; IVF-PQ beyond


@dataclass(frozen=True)
class IndexSpec:
    """Which inner-product index to build, with its build and search parameters.

    flat: exact. hnsw: graph of `hnsw_m` links per node, built with `ef_construction` candidates, searched with
    `ef_search`. ivfflat / ivfpq: `nlist` k-means cells (of exact vectors / of `pq_m`-byte product-quantised codes),
    `nprobe` cells searched; the quantisers are trained on `train_sample` rows drawn evenly from every shard.
    auto: `for_size` picks flat, hnsw or ivfpq by the database's size. The search parameters are stored in the index
    file. `refine` (ivfpq): candidates per query re-scored exactly against the stored vectors (0: the codes' scores).
    """

    kind: Literal["auto", "flat", "hnsw", "ivfflat", "ivfpq"] = "flat"
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    nlist: int = 1024
    pq_m: int = 32
    nprobe: int = 16
    train_sample: int = 262_144
    refine: int = 0

    def factory(self) -> str:
        """The faiss.index_factory string."""
        # "np": no polysemous training, which faiss otherwise runs for 8-bit PQ (minutes, unused by the search)
        return {"flat": "Flat", "hnsw": f"HNSW{self.hnsw_m}", "ivfflat": f"IVF{self.nlist},Flat",
                "ivfpq": f"IVF{self.nlist},PQ{self.pq_m}np"}[self.resolved_kind()]

    def resolved_kind(self) -> Kind:
        if self.kind == "auto":
            raise ValueError("index kind 'auto' is resolved by IndexSpec.for_size(rows, dim) before building")
        return self.kind

    def for_size(self, n: int, dim: int) -> IndexSpec:
        """This spec with `auto` resolved for n rows of `dim`: flat up to EXACT_UP_TO rows, then hnsw while the
        vectors take at most VECTORS_UP_TO_MIB, then ivfpq (its pq_m lowered to the largest divisor of dim, if
        needed); any other kind unchanged."""
        if self.kind != "auto":
            return self
        if n <= EXACT_UP_TO:
            return replace(self, kind="flat")
        if n * dim * 4 <= VECTORS_UP_TO_MIB * 2**20:
            return replace(self, kind="hnsw")
        return replace(self, kind="ivfpq", pq_m=max(m for m in range(1, self.pq_m + 1) if dim % m == 0))

    @property
    def trained(self) -> bool:
        return self.resolved_kind() in ("ivfflat", "ivfpq")


_PQ_CENTROIDS = 256  # 8-bit codes: each sub-quantiser is trained with k-means into 256 centroids
Shard = Callable[[], npt.ArrayLike]  # loads one shard's rows, e.g. `lambda: np.load(path, mmap_mode="r")`
Rows = Callable[[np.ndarray], npt.ArrayLike]  # the database vectors of sorted unique ids, e.g. rows of memory-mapped shards
_REFINE_QUERIES = 64  # queries re-scored at a time: 64 x candidates x dim floats


def new_index(spec: IndexSpec, dim: int, with_ids: bool = False) -> faiss.Index:
    """An empty inner-product index of a resolved `spec`. `with_ids`: it takes caller ids (`add_with_ids`): IVF
    indexes hold ids natively (an id map over one would misnumber after a removal), flat and HNSW ones through an
    IndexIDMap2."""
    kind = spec.resolved_kind()
    if kind == "ivfpq" and dim % spec.pq_m:
        raise ValueError(f"IVF-PQ: pq_m={spec.pq_m} must divide the descriptor dimension {dim}")
    wrapped = with_ids and not spec.trained
    index = faiss.index_factory(dim, ("IDMap2," if wrapped else "") + spec.factory(), faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        inner = faiss.downcast_index(faiss.downcast_index(index).index) if wrapped else index
        inner.hnsw.efConstruction = spec.ef_construction
    return index


def build_index(descriptors: npt.ArrayLike, spec: IndexSpec = IndexSpec()) -> faiss.Index:
    """An inner-product index of `spec` over unit-norm rows (scores are cosine similarities)."""
    return build_index_from_shards([lambda: descriptors], spec)


def build_index_from_shards(shards: Sequence[Shard], spec: IndexSpec = IndexSpec(), first_id: int | None = None,
                            seed: int = 0) -> faiss.Index:
    """An index of `spec` (`auto` resolved by the total size) over the rows of `shards`, in order, holding one shard
    at a time: a first pass counts the rows and, for IVF kinds, draws the training sample (`spec.train_sample`
    rows, each shard contributing in proportion to its size); a second adds shard by shard. Row r of the database
    gets id r (`first_id` None: positions, as faiss numbers them) or `first_id` + r (ids kept through removals;
    see `new_index`)."""
    if not shards:
        raise ValueError("descriptors must be a non-empty 2-D array (rows x dims), got no shards")
    sizes, dim, sample = _first_pass(shards, spec, seed)
    n = sum(sizes)
    spec = spec.for_size(n, dim)
    if spec.trained and n < max(spec.nlist, _PQ_CENTROIDS if spec.kind == "ivfpq" else 0):
        need = f"max(nlist={spec.nlist}, {_PQ_CENTROIDS})" if spec.kind == "ivfpq" else f"nlist={spec.nlist}"
        raise ValueError(f"{spec.kind}: training needs at least {need} rows, got {n}")
    index = new_index(spec, dim, with_ids=first_id is not None)
    if spec.trained:
        index.train(sample)
    del sample
    start = first_id or 0
    for load, size in zip(shards, sizes, strict=True):
        x = _checked(load)
        if len(x) != size:
            raise ValueError(f"a shard gave {len(x)} rows on the second read, {size} on the first")
        if first_id is None:
            index.add(x)
        else:
            index.add_with_ids(x, np.arange(start, start + size, dtype=np.int64))
        start += size
        del x
    set_search_parameters(index, spec)
    return index


def _first_pass(shards: Sequence[Shard], spec: IndexSpec, seed: int) -> tuple[list[int], int, np.ndarray | None]:
    """Each shard's row count, the dimension, and (for a trained kind) the training sample."""
    shapes = [np.shape(load()) for load in shards]  # a memory-mapped shard is not read for its shape
    for i, shape in enumerate(shapes):
        if len(shape) != 2 or shape[1] != shapes[0][1]:
            raise ValueError(f"descriptor shards must be 2-D arrays of one width: shard {i} has shape {shape}")
    sizes = [shape[0] for shape in shapes]
    if not sum(sizes):
        raise ValueError("descriptors must be a non-empty 2-D array (rows x dims), got 0 rows")
    dim = shapes[0][1]
    if not spec.for_size(sum(sizes), dim).trained:
        return sizes, dim, None
    rng = np.random.default_rng(seed)
    fraction = min(1.0, spec.train_sample / sum(sizes))
    parts = [_check_unit_rows(np.asarray(load())[np.sort(rng.choice(size, round(size * fraction), replace=False))],
                              "descriptors") for load, size in zip(shards, sizes, strict=True) if round(size * fraction)]
    return sizes, dim, np.concatenate(parts)


def _checked(load: Shard) -> npt.NDArray[np.float32]:
    return _check_unit_rows(load(), "descriptors")


def set_search_parameters(index: faiss.Index, spec: IndexSpec) -> None:
    """Set efSearch (HNSW) or nprobe (IVF) of `index` (or of the index inside its id map) from `spec`; an exact
    index has none."""
    name, value = {"hnsw": ("efSearch", spec.ef_search), "ivfflat": ("nprobe", spec.nprobe),
                   "ivfpq": ("nprobe", spec.nprobe)}.get(spec.kind, (None, None))
    if name:
        faiss.ParameterSpace().set_index_parameter(index, name, value)


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


def refined_search(index: faiss.Index, queries: npt.ArrayLike, k: int, candidates: int,
                   rows: Rows) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """`search`'s answer with the approximate index's top `candidates` (at least k) per query re-scored by the exact
    inner product with their vectors (`rows` of the ids found; each id fetched once per chunk of queries, in order,
    so memory-mapped shards are read sequentially) and the best k kept; ids −1 where fewer were found."""
    q = _check_unit_rows(queries, "queries")
    k = min(int(k), index.ntotal)
    _, found = search(index, q, max(int(candidates), k))
    scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    ids = np.full((len(q), k), -1, dtype=np.int64)
    for start in range(0, len(q), _REFINE_QUERIES):
        chunk = found[start:start + _REFINE_QUERIES]
        unique, where = np.unique(chunk, return_inverse=True)
        valid = unique >= 0
        vectors = np.zeros((len(unique), q.shape[1]), dtype=np.float32)
        vectors[valid] = np.asarray(rows(unique[valid]), dtype=np.float32)
        exact = np.einsum("qcd,qd->qc", vectors[where.reshape(chunk.shape)], q[start:start + _REFINE_QUERIES])
        exact[chunk < 0] = -np.inf
        best = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores[start:start + len(chunk)] = np.take_along_axis(exact, best, axis=1)
        ids[start:start + len(chunk)] = np.where(np.isfinite(scores[start:start + len(chunk)]),
                                                 np.take_along_axis(chunk, best, axis=1), -1)
    return scores, ids
