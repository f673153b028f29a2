"""Search: queries/s of Firesight's search path (`components.search.index.search`) against raw faiss on the same
index; flat vs IVF-PQ vs HNSW (Firesight's `IndexSpec` kinds) at each database size: build time, memory, queries/s
and recall@10 against exact search, sweeping each index's search parameter; and, as what IVF-PQ would need to
reach high recall, the same IVF-PQ with an exact re-rank of its candidates (faiss IndexRefineFlat, not a Firesight
kind)."""

from __future__ import annotations

import gc
from dataclasses import replace
from typing import Any

import faiss
import numpy as np

from bench.data import real_images
from bench.descriptors import ClusteredDescriptors, neighbour_similarity, real_descriptors
from bench.measure import goal, interleaved_rates, measured, ratio, rss_mib
from components.search.index import IndexSpec, build_index, search, set_search_parameters
from pipelines.params import load_params

K = 10
GOAL_RATIO = 0.95
GOAL_RECALL, GOAL_QPS, GOAL_SIZE = 0.95, 1000, 1_000_000
SIZES = {
    "quick": {"sizes": (20_000,), "queries": 500, "real_images": 600, "single_queries": 100,
              "ef_search": (16, 64, 256), "nprobe": (1, 16, 64), "rerank": ((16, 4), (64, 16)), "rounds": 5},
    "full": {"sizes": (100_000, 1_000_000), "queries": 1000, "real_images": None, "single_queries": 200,
             "ef_search": (16, 32, 64, 128, 256, 512), "nprobe": (1, 4, 16, 64, 256),
             "rerank": ((16, 4), (16, 16), (64, 4), (64, 16)), "rounds": 7},
}
FLAT_TIMED_QUERIES = 100  # exhaustive search is slow: its Firesight-vs-faiss comparison uses fewer queries
SEED = 0


def specs(n: int, dim: int) -> list[IndexSpec]:
    """Flat; HNSW32 (efConstruction 40); IVF-PQ with about 4·√n cells (a power of two, at most 1024: its k-means
    runs on 2 cores) of 64-byte codes (or the largest of 32/16/8 bytes that divides the dimension)."""
    nlist = min(1024, 2 ** round(np.log2(4 * np.sqrt(n))))
    pq_m = next(m for m in (64, 32, 16, 8) if dim % m == 0)
    return [IndexSpec("flat"), IndexSpec("hnsw", hnsw_m=32, ef_construction=40, ef_search=64),
            IndexSpec("ivfpq", nlist=nlist, pq_m=pq_m, nprobe=16)]


def run(mode: str) -> dict[str, Any]:
    size = SIZES[mode]
    params = load_params()
    images = real_images(limit=size["real_images"])
    with measured() as embedding:
        real = real_descriptors(params.model, images.uris, params.index.batch_size)
    model = ClusteredDescriptors.fit(real, images.labels)
    rng = np.random.default_rng(SEED)
    check = min(len(real), 4000)
    synthetic_check = np.empty((check, real.shape[1]), dtype=np.float32)
    model.fill(synthetic_check, rng)
    result: dict[str, Any] = {
        "real": {"source": images.source, "images": len(images), "classes": len(set(images.labels)),
                 "dim": int(real.shape[1]), "model": params.model.backbone, "pooling": params.model.pooling_spec().name,
                 "embedding": embedding},
        "realism": {"rows": check, "real": neighbour_similarity(real[rng.permutation(len(real))[:check]]),
                    "synthetic": neighbour_similarity(synthetic_check)},
        "sizes": [],
    }
    for n in size["sizes"]:
        result["sizes"].append(_benchmark_size(n, real, np.asarray(images.labels), model, size, rng))
        gc.collect()
    result["goals"] = _goals(result["sizes"])
    return result


def _benchmark_size(n: int, real: np.ndarray, labels: np.ndarray, model: ClusteredDescriptors, size: dict,
                    rng: np.random.Generator) -> dict[str, Any]:
    db, queries, real_in_db = _database(n, real, model, size["queries"], rng)
    out: dict[str, Any] = {"n": n, "dim": int(db.shape[1]), "queries": len(queries), "real_in_db": real_in_db,
                           "real_queries": len(queries) // 2, "kinds": []}
    exact = None
    for spec in specs(n, db.shape[1]):
        before = rss_mib()
        with measured() as build:
            index = build_index(db, spec)
        build["rss_growth_mib"] = round(rss_mib() - before, 1)
        entry: dict[str, Any] = {"kind": spec.kind, "factory": spec.factory(), "build": build}
        if exact is None:  # the flat index comes first: its answers are the ground truth
            with measured() as truth:
                _, exact = index.search(queries, K)
            truth["queries_per_s"] = round(len(queries) / truth["wall_seconds"], 2)
            entry["exhaustive_search"] = truth
        entry["sweep"] = _sweep(index, spec, queries, exact, size)
        entry["vs_faiss"] = _versus_faiss(index, spec, queries, size)
        out["kinds"].append(entry)
        if spec.kind == "ivfpq":
            out["kinds"].append(_reranked(index, db, queries, exact, size))
        del index
        gc.collect()
    return out


def _database(n: int, real: np.ndarray, model: ClusteredDescriptors, n_queries: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """n database rows: real descriptors, then synthetic ones; queries: half held-out real descriptors, half new
    members of the database's synthetic clusters."""
    order = rng.permutation(len(real))
    real_queries = real[order[: n_queries // 2]]
    real_db = real[order[n_queries // 2:]][: n]
    synthetic_queries = n_queries - len(real_queries)
    rows = np.empty((n + synthetic_queries, real.shape[1]), dtype=np.float32)
    rows[: len(real_db)] = real_db
    model.fill(rows[len(real_db):], rng)
    picked = len(real_db) + rng.choice(n - len(real_db), size=synthetic_queries, replace=False)
    queries = np.concatenate([real_queries, rows[picked]])
    rows[picked] = rows[n:]  # the surplus rows take the picked queries' places in the database
    return rows[:n], np.ascontiguousarray(queries), len(real_db)


def _sweep(index: faiss.Index, spec: IndexSpec, queries: np.ndarray, exact: np.ndarray, size: dict) -> list[dict]:
    """queries/s (one batch, Firesight's search) and recall@10 for each value of the index's search parameter."""
    field = {"hnsw": "ef_search", "ivfpq": "nprobe"}.get(spec.kind)
    points = []
    for value in size[field] if field else (None,):
        if field:
            set_search_parameters(index, replace(spec, **{field: value}))
        timed = queries[:FLAT_TIMED_QUERIES] if spec.kind == "flat" else queries
        points.append(_point(index, timed, exact, f"{field}={value}" if field else "exact"))
    set_search_parameters(index, spec)
    return points


def _point(index: faiss.Index, queries: np.ndarray, exact: np.ndarray, setting: str) -> dict[str, Any]:
    with measured() as record:
        _, found = search(index, queries, K)
    return {"setting": setting, "queries_per_s": round(len(queries) / record["wall_seconds"], 1),
            "recall_at_10": _recall(found, exact[: len(queries)]), **record}


def _reranked(ivfpq: faiss.Index, db: np.ndarray, queries: np.ndarray, exact: np.ndarray, size: dict) -> dict[str, Any]:
    """The IVF-PQ index wrapped in IndexRefineFlat: its k_factor·k best candidates re-ranked by exact inner product
    (which keeps a flat copy of the vectors)."""
    before = rss_mib()
    with measured() as build:
        refined = faiss.IndexRefineFlat(ivfpq, faiss.swig_ptr(db))
    build["rss_growth_mib"] = round(rss_mib() - before, 1)
    points = []
    for nprobe, k_factor in size["rerank"]:
        ivfpq.nprobe, refined.k_factor = nprobe, k_factor
        points.append(_point(refined, queries, exact, f"nprobe={nprobe}, k_factor={k_factor}"))
    return {"kind": "ivfpq+rerank", "factory": "IVF-PQ above + RFlat (faiss, not a Firesight kind)", "build": build,
            "sweep": points}


def _versus_faiss(index: faiss.Index, spec: IndexSpec, queries: np.ndarray, size: dict) -> dict[str, Any]:
    """Firesight's search() against index.search() on the same index and queries: one batch, and one query per
    call (the latency path)."""
    batch = queries[:FLAT_TIMED_QUERIES] if spec.kind == "flat" else queries
    single = queries[: max(1, size["single_queries"] // (10 if spec.kind == "flat" else 1))]
    rates = {
        "batch": interleaved_rates({"faiss": lambda: index.search(batch, K), "firesight": lambda: search(index, batch, K)},
                                   work=len(batch), rounds=size["rounds"]),
        "single": interleaved_rates({"faiss": lambda: [index.search(q[None], K) for q in single],
                                     "firesight": lambda: [search(index, q[None], K) for q in single]},
                                    work=len(single), rounds=size["rounds"]),
    }
    return {mode: {"faiss_queries_per_s": r["faiss"]["rate"], "firesight_queries_per_s": r["firesight"]["rate"],
                   "ratio": ratio(r["firesight"]["rate"], r["faiss"]["rate"]), "queries": n,
                   "loadavg_start": r["faiss"]["loadavg_start"]}
            for (mode, r), n in zip(rates.items(), (len(batch), len(single)))}


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(np.intersect1d(f[f >= 0], e)) for f, e in zip(found, exact, strict=True)]
    return round(float(np.mean(hits)) / exact.shape[1], 4)


def _goals(sizes: list[dict]) -> list[dict]:
    largest = sizes[-1]
    firesight_kinds = [k for k in largest["kinds"] if "vs_faiss" in k]
    worst = min(k["vs_faiss"]["batch"]["ratio"] for k in firesight_kinds)
    worst_single = min(k["vs_faiss"]["single"]["ratio"] for k in firesight_kinds)
    best_qps = max((p["queries_per_s"] for k in firesight_kinds for p in k["sweep"] if p["recall_at_10"] >= GOAL_RECALL),
                   default=0.0)
    at = f" at {largest['n']:,}" + ("" if largest["n"] >= GOAL_SIZE else f" (goal is at {GOAL_SIZE:,})")
    return [goal(f"search: Firesight vs faiss, batch of queries (worst index kind{at})", worst, GOAL_RATIO),
            goal(f"search: Firesight vs faiss, one query per call (worst index kind{at})", worst_single, GOAL_RATIO),
            goal(f"search: queries/s at recall@10 ≥ {GOAL_RECALL}{at} (Firesight's index kinds)", best_qps, GOAL_QPS,
                 unit=" q/s")]
