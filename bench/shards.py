"""Shard-wise index builds (`components.search.index.build_index_from_shards`) from descriptor files on disk, as a
database that outgrows memory is built: build time, the builder's peak anonymous memory (heap, not the file pages
the memory-mapped shards bring in, which the kernel can drop), recall@10 against exact search and queries/s; for
IVF-PQ also with its shortlist re-scored exactly against the memory-mapped shards (`refined_search`).

Descriptors: the search benchmark's clustered synthetic model fitted to real descriptors of the dataset (the
larger size in a PCA-reduced space: 10M full-width descriptors would take 48 GiB), written as .npy shards of
`shard_mib` each. Queries: a fresh within-class draw around randomly chosen database rows. Exact neighbours come
from a shard-by-shard flat search.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.data import real_images
from bench.descriptors import ClusteredDescriptors, real_descriptors
from bench.measure import measured
from components.search.index import IndexSpec, build_index_from_shards, refined_search, search, set_search_parameters
from pipelines.params import load_params

K = 10
SEED = 0
REFINES = (100, 400)  # IVF-PQ: candidates per query re-scored against the shards
SIZES = {  # databases: (rows, dimension, the index specs built)
    "quick": {"real_images": 600, "queries": 200, "nprobe": (1, 4, 16, 64), "shard_mib": 8,
              "databases": [(100_000, 128, [IndexSpec("ivfflat", nlist=256, nprobe=16),
                                             IndexSpec("ivfpq", nlist=256, pq_m=32, nprobe=16)])]},
    "full": {"real_images": 2000, "queries": 1000, "nprobe": (1, 4, 16, 64, 256), "shard_mib": 512,
             "databases": [(1_000_000, 1280, [IndexSpec("ivfflat", nlist=1024, nprobe=16),
                                               IndexSpec("ivfpq", nlist=1024, pq_m=64, nprobe=16)]),
                           (10_000_000, 128, [IndexSpec("ivfpq", nlist=4096, pq_m=32, nprobe=16)])]},
}


def run(mode: str) -> dict[str, Any]:
    size = SIZES[mode]
    params = load_params()
    images = real_images(limit=size["real_images"])
    real = real_descriptors(params.model, images.uris, params.index.batch_size)
    rng = np.random.default_rng(SEED)
    out: dict[str, Any] = {"real": {"source": images.source, "images": len(images), "dim": int(real.shape[1])},
                           "shard_mib": size["shard_mib"], "databases": []}
    for n, dim, specs in size["databases"]:
        folder = Path(tempfile.mkdtemp(prefix="firesight-shards-"))
        try:
            model = ClusteredDescriptors.fit(_reduced(real, dim), images.labels, components=min(128, dim))
            shard_rows = size["shard_mib"] * 2**20 // (4 * dim)
            paths, queries = _write_shards(folder, n, dim, shard_rows, size["queries"], model, rng)
            with measured() as truth:
                exact = _exact_neighbours(paths, queries)
            entry: dict[str, Any] = {"n": n, "dim": dim, "shards": len(paths), "queries": len(queries),
                                     "exact_search": truth, "kinds": []}
            for spec in specs:
                loaders = [lambda p=p: np.load(p, mmap_mode="r") for p in paths]
                with measured() as build, peak_anonymous_memory() as memory:
                    index = build_index_from_shards(loaders, spec)
                build["peak_anonymous_mib_growth"] = memory["peak_growth_mib"]
                sweep = _sweep(index, spec, queries, exact, size["nprobe"])
                if spec.kind == "ivfpq":
                    rows = _shard_rows(paths, shard_rows)
                    sweep += [p for refine in REFINES
                              for p in _sweep(index, spec, queries, exact, size["nprobe"], rows, refine)]
                entry["kinds"].append({"factory": spec.factory(), "train_sample": spec.train_sample, "build": build,
                                       "index_mib": round(faiss.serialize_index(index).nbytes / 2**20, 1),
                                       "sweep": sweep})
                del index
                gc.collect()
            out["databases"].append(entry)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return out


def _reduced(real: np.ndarray, dim: int) -> np.ndarray:
    """`real` projected on its top `dim` principal directions and re-normalised (itself when dim is its width)."""
    if dim >= real.shape[1]:
        return real
    _, _, vt = np.linalg.svd(real - real.mean(axis=0), full_matrices=False)
    x = real @ vt[:dim].T
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_shards(folder: Path, n: int, dim: int, shard_rows: int, n_queries: int, model: ClusteredDescriptors,
                  rng: np.random.Generator) -> tuple[list[Path], np.ndarray]:
    """n synthetic rows in shards on disk (each written through a memory map), and queries: new members of the
    clusters of randomly chosen database rows (a database row, perturbed by the within-class model)."""
    paths = []
    for i, start in enumerate(range(0, n, shard_rows)):
        path = folder / f"descriptors-{i:05d}.npy"
        shard = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(min(shard_rows, n - start), dim))
        model.fill(shard, rng)
        shard.flush()
        del shard
        paths.append(path)
    picks = np.sort(rng.choice(n, n_queries, replace=False))
    rows = np.stack([np.load(paths[p // shard_rows], mmap_mode="r")[p % shard_rows] for p in picks])
    drawn = model.within.sample(n_queries, rng, centres=rows)
    return paths, np.ascontiguousarray(drawn / np.linalg.norm(drawn, axis=1, keepdims=True), dtype=np.float32)


def _exact_neighbours(paths: list[Path], queries: np.ndarray) -> np.ndarray:
    """The exact top-K database ids of each query, searching one shard at a time and merging."""
    heap = faiss.ResultHeap(len(queries), K, keep_max=True)
    start = 0
    for path in paths:
        shard = np.load(path, mmap_mode="r")
        scores, ids = faiss.knn(queries, np.ascontiguousarray(shard), K, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(ids >= 0, ids + start, -1))
        start += len(shard)
    heap.finalize()
    return heap.I


def _shard_rows(paths: list[Path], shard_rows: int):
    """rows(ids) of the database in memory-mapped shards of `shard_rows` rows (the last may be shorter)."""
    shards = [np.load(p, mmap_mode="r") for p in paths]

    def rows(ids: np.ndarray) -> np.ndarray:
        return np.concatenate([shards[s][ids[ids // shard_rows == s] % shard_rows] for s in np.unique(ids // shard_rows)])

    return rows


def _sweep(index: faiss.Index, spec: IndexSpec, queries: np.ndarray, exact: np.ndarray, nprobes, rows=None,
           refine: int = 0) -> list[dict]:
    """recall@10 and queries/s at each nprobe; with `rows` the shortlist of `refine` candidates re-scored."""
    def run(q: np.ndarray) -> np.ndarray:
        return refined_search(index, q, K, refine, rows)[1] if refine else search(index, q, K)[1]

    points = []
    for nprobe in nprobes:
        set_search_parameters(index, replace(spec, nprobe=nprobe))
        run(queries[:10])  # warm-up
        with measured() as record:
            found = run(queries)
        hits = [len(np.intersect1d(f[f >= 0], e)) for f, e in zip(found, exact, strict=True)]
        points.append({"nprobe": nprobe, "refine": refine,
                       "queries_per_s": round(len(queries) / record["wall_seconds"], 1),
                       "recall_at_10": round(float(np.mean(hits)) / K, 4), **record})
    set_search_parameters(index, spec)
    return points


def _anonymous_mib() -> float:
    """This process's resident anonymous memory (RssAnon): its heap, not file pages mapped in."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def peak_anonymous_memory(interval: float = 0.05) -> Iterator[dict[str, float]]:
    """The peak growth of RssAnon over the body, polled every `interval` s."""
    record = {"peak_growth_mib": 0.0}
    base, peak, done = _anonymous_mib(), [0.0], threading.Event()

    def poll() -> None:
        while not done.wait(interval):
            peak[0] = max(peak[0], _anonymous_mib() - base)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield record
    finally:
        done.set()
        thread.join()
        record["peak_growth_mib"] = round(max(peak[0], _anonymous_mib() - base), 1)
