"""Markdown tables from a results JSON written by `python -m bench`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "met" if v else "**not met**"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _load(record: dict) -> str:
    start, end = record.get("loadavg_start"), record.get("loadavg_end")
    return f"{start[0]:.1f} → {end[0]:.1f}" if start and end else f"{start[0]:.1f}" if start else "—"


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    parts = [
        f"# Firesight benchmarks — {results['mode']} run, {results['started'][:10]}",
        "",
        f"`{results['command']}` at git {results['git_commit']}, {results['started']} → {results['ended']} "
        f"({results['wall_seconds'] / 60:.1f} min); load average (1 min) {_load(results)}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, {m['os']}; Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
    ]
    goals = [(g["goal"], g["measured"], g["target"], g["met"]) for s in results["sections"].values()
             for g in s.get("goals", [])]
    if goals:
        parts += ["", "## Goals", "", table(["goal", "measured", "target", ""], goals)]
    for name, section in results["sections"].items():
        parts += ["", f"## {name}", ""]
        if "error" in section:
            parts.append(f"Failed: `{section['error']}`")
            continue
        parts.append(RENDERERS[name](section))
    return "\n".join(parts) + "\n"


def _extract(s: dict) -> str:
    c, mdl, ms = s["comparison"], s["model"], s["ms_per_image"]
    return "\n\n".join([
        f"{s['images']['count']} real images ({s['images']['classes']} classes) of {s['images']['source']}; "
        f"{mdl['arch']} + {mdl['pooling']}, longer side {mdl['image_size']}, batch {mdl['batch_size']}, "
        f"{mdl['threads']} torch threads.",
        table(["path", "images/s (median)", "rounds", "load avg"],
              [(name, r["rate"], ", ".join(f"{x:.1f}" for x in r["rates"]), _load(r)) for name, r in c.items()]
              + [("ratio Firesight / bare", s["ratio"], "", "")]),
        "On Ray Data (`index.engine: ray`, a warm local Ray): the images described "
        f"{s['ray_data'][0]['images'] // s['images']['count']} times a run, in rounds interleaved with the bare "
        "loop over as many tensors; each run starts its actors (the time to its first block), then runs at its "
        "steady rate (the images after the first block over the time to the last):"
        if s.get("ray_data") else "",
        table(["actors × CPUs", "images a run", "wall (s)", "start-up (s)", "steady images/s (rounds)",
               "bare images/s (rounds)", "steady ratio vs bare", "load avg"],
              [(f"{r['actors']} × {r['cpus_per_actor']}", r["images"], r["wall_seconds"], r["startup_seconds"],
                f"{r['steady_images_per_s']} ({', '.join(f'{x:.1f}' for x in r['steady_rates'])})",
                f"{r['bare_images_per_s']} ({', '.join(f'{x:.1f}' for x in r['bare_rates'])})",
                r["steady_ratio_vs_bare"], _load(r)) for r in s.get("ray_data", [])]),
        "Cost per image, each step alone (one pass):",
        table(["decode (PIL)", "resize + normalise + pad", "forward (batch " + str(mdl["batch_size"]) + ")"],
              [(f"{ms['decode']:.1f} ms", f"{ms['resize_and_pad']:.1f} ms", f"{ms['forward']:.1f} ms")]),
        "Batch size and threads (one round each):",
        table(["threads", "batch", "bare images/s", "Firesight images/s", "ratio", "load avg"],
              [(g["threads"], g["batch_size"], g["bare_images_per_s"], g["firesight_images_per_s"], g["ratio"],
                _load(g)) for g in s["grid"]]),
    ])


def _train(s: dict) -> str:
    st = s["setup"]
    lines = [
        f"{st['images']} real images of {st['classes']} classes, {st['pairs_per_epoch']} pairs "
        f"({st['samples_per_epoch']} images) per epoch, {st['epochs']} epochs, batches of {st['batch_size_pairs']} "
        f"pairs, {st['model']} with {st['frozen_stages']} frozen stages, longer side in {list(st['train_max_side'])}.",
        table(["path", "workers", "threads each", "images/s", "trained (s)", "job wall (s)", "load avg"],
              [(r["path"], r["workers"], r["threads"], r["samples_per_s"], r.get("trained_seconds"),
                r.get("job_wall_seconds"), _load(r)) for r in s["runs"]]),
        table(["ratio", "value"],
              [("Ray Train 1 worker / bare (1 thread)", s["ratio_1_worker_vs_bare"]),
               ("2 workers / 1 worker (1 thread each)", s["scaling_2_workers_vs_1"])]
              + ([("Ray Train 1 worker × 2 threads / bare (2 threads)", s["ratio_1_worker_2_threads_vs_bare"])]
                 if "ratio_1_worker_2_threads_vs_bare" in s else [])),
    ]
    return "\n\n".join(lines)


def _search(s: dict) -> str:
    r, real = s["realism"], s["real"]
    parts = [
        f"Real descriptors: {real['images']:,} images ({real['classes']} classes) of {real['source']}, "
        f"{real['model']} + {real['pooling']} with ImageNet weights, {real['dim']}-d.",
        f"Realism of the synthetic extension ({r['rows']:,} rows each; mean cosine similarity):",
        table(["descriptors", "nearest neighbour", "10th neighbour", "random pair"],
              [(name, r[name]["nn1"], r[name]["nn10"], r[name]["random_pair"]) for name in ("real", "synthetic")]),
    ]
    for size in s["sizes"]:
        parts += [
            f"### {size['n']:,} descriptors ({size['real_in_db']:,} real), {size['queries']:,} queries "
            f"({size['real_queries']:,} held-out real)",
            table(["index", "build (s)", "RSS growth (MiB)", "load avg"],
                  [(k["factory"], k["build"]["wall_seconds"], k["build"]["rss_growth_mib"], _load(k["build"]))
                   for k in size["kinds"]]),
            table(["index", "search parameter", "queries/s (batch)", "recall@10"],
                  [(k["factory"], p["setting"], p["queries_per_s"], p["recall_at_10"])
                   for k in size["kinds"] for p in k["sweep"]]),
            "Firesight's `search()` vs `index.search()` on the same index (default search parameter):",
            table(["index", "calls", "queries", "faiss q/s", "Firesight q/s", "ratio", "load avg"],
                  [(k["factory"], mode, v["queries"], v["faiss_queries_per_s"], v["firesight_queries_per_s"],
                    v["ratio"], _load(v)) for k in size["kinds"] for mode, v in k.get("vs_faiss", {}).items()]),
        ]
    return "\n\n".join(parts)


def _ray(s: dict) -> str:
    o = s["overhead_seconds"]
    startup = table(["step", "wall (s)", "overhead vs bare (s)", "load avg"], [
        (f"bare loop ({s['steps']} steps)", s["bare_loop"]["wall_seconds"], None, _load(s["bare_loop"])),
        ("ray.init (ensure_ray, cold)", s["ray_init"]["wall_seconds"], o["ray_init"], _load(s["ray_init"])),
        ("trivial job, 1 worker", s["job_1_worker"]["wall_seconds"], o["job_1_worker"], _load(s["job_1_worker"])),
        ("trivial job, 2 workers", s["job_2_worker"]["wall_seconds"], o["job_2_worker"], _load(s["job_2_worker"])),
        ("ray.shutdown", s["ray_shutdown"]["wall_seconds"], None, _load(s["ray_shutdown"])),
    ])
    if "idle" not in s:
        return startup
    idle = [("as `ensure_ray` starts it (dashboard on)", s["idle"]), ("without the dashboard", s["idle_without_dashboard"])]
    return "\n\n".join([
        startup,
        f"An idle local Ray ({s['idle']['seconds']:.0f} s, nothing running): CPU in % of one core, memory as PSS.",
        table(["local Ray", "CPU (%)", "PSS (MiB)", "processes (CPU %, PSS MiB)"],
              [(name, r["cpu_percent"], r["pss_mib"], "; ".join(
                  f"{p} ×{v['processes']} ({v['cpu_percent']}, {v['pss_mib']:.0f})" for p, v in r["by_process"].items()))
               for name, r in idle]),
    ])


def _pipeline(s: dict) -> str:
    runs = [(r["stage"], r) for r in s["stages"]] + ([("no-op `dvc repro`", s["noop_repro"])] if s["noop_repro"] else [])
    rows = [(name, r["wall_seconds"], r.get("in_stage_seconds"), r["peak_pss_tree_mib"], r["peak_rss_tree_mib"],
             r["peak_rss_largest_process_mib"], r["processes_seen"], _load(r), "ok" if r["returncode"] == 0 else "failed")
            for name, r in runs]
    overrides = f" with {s['overrides']}" if s["overrides"] else ""
    return "\n\n".join([
        f"Data: {s['data']}{overrides}; stages run one by one (`dvc repro -s`), {s['total_seconds']:.0f} s in all; "
        f"test mAP {s['test_map']:.4f}." if s["test_map"] is not None else f"Data: {s['data']}{overrides}.",
        table(["stage", "wall (s)", "in-stage (s)", "peak PSS, process tree (MiB)", "peak RSS sum (MiB)",
               "largest process RSS (MiB)", "processes", "load avg", ""], rows),
    ])


def _accuracy(s: dict) -> str:
    overrides = f" with {s['overrides']}" if s["overrides"] else ""
    parts = [
        f"Data: {s['data']}{overrides}; each row a whole `dvc repro` with that backbone and pooling.",
        table(["backbone", "pooling", "off-the-shelf mAP", "fine-tuned mAP", "classify (s)", "retrieval (s)",
               "training (s)", "mAP gain per training minute", "load avg"],
              [(r["backbone"] + (" (the pipeline section's run)" if r.get("from") else ""), r["pooling"], _map(r["off_the_shelf_map"]), _map(r["test_map"]), r["classify_seconds"],
                r["retrieval_seconds"], r["training_seconds"],
                _gain_per_minute(r["test_map"], r["off_the_shelf_map"], r["training_seconds"]), _load(r))
               for r in s["choices"]]),
    ]
    if s["ablation"]:
        parts += ["The ablation's method rows (docs/ablation.json, full Caltech-101; wall time of each row: "
                  "training, if any, plus embedding the test set):",
                  table(["method", "test mAP", "wall (s)"],
                        [(r["row"], _map(r["map"]), r["wall_seconds"]) for r in s["ablation"]])]
    return "\n\n".join(parts)


def _map(v: float | None) -> str | None:
    return None if v is None else f"{v:.4f}"


def _gain_per_minute(fine_tuned: float | None, start: float | None, seconds: float) -> float | None:
    return round((fine_tuned - start) / (seconds / 60), 4) if fine_tuned is not None and start is not None and seconds else None


def _shards(s: dict) -> str:
    parts = [f"Shards of {s['shard_mib']} MiB on disk, memory-mapped; the synthetic model fitted to {s['real']['images']:,} "
             f"real {s['real']['dim']}-d descriptors of {s['real']['source']}."]
    for db in s["databases"]:
        parts += [
            f"### {db['n']:,} descriptors × {db['dim']} dims in {db['shards']} shards, {db['queries']:,} queries "
            f"(exact top-{10} by a shard-wise flat search: {db['exact_search']['wall_seconds']:.0f} s)",
            table(["index", "train sample", "build (s)", "builder's peak heap growth (MiB)", "index size (MiB)", "load avg"],
                  [(k["factory"], k["train_sample"], k["build"]["wall_seconds"], k["build"]["peak_anonymous_mib_growth"],
                    k["index_mib"], _load(k["build"])) for k in db["kinds"]]),
            table(["index", "nprobe", "re-scored candidates", "queries/s (batch)", "recall@10"],
                  [(k["factory"], p["nprobe"], p.get("refine") or "–", p["queries_per_s"], p["recall_at_10"])
                   for k in db["kinds"] for p in k["sweep"]]),
        ]
    return "\n\n".join(parts)


def _decode(s: dict) -> str:
    if "skipped" in s:
        return f"Skipped: {s['skipped']}."
    img, mdl = s["images"], s["model"]
    return "\n\n".join([
        f"{img['count']} JPEGs of {img['source']} (mean {img['mean_size'][0]} × {img['mean_size'][1]}) and "
        f"{img['phones']} phone-sized copies; described at {mdl['image_size']} px, so decoded down to a longer side "
        f"≥ {mdl['draft_side']}; batch {mdl['batch_size']}, {mdl['threads']} torch threads.",
        table(["images", "full decode (ms/image)", "draft decode (ms/image)", "speed-up"],
              [(name, d["ms_per_image"]["full"], d["ms_per_image"]["draft"], d["speedup"])
               for name, d in s["decode"].items()]),
        f"Embedding the {img['phones']} phone-sized copies:",
        table(["path", "images/s (median)", "rounds", "ratio vs bare", "load avg"],
              [(name, r["rate"], ", ".join(f"{x:.1f}" for x in r["rates"]), s["ratios"].get(name, ""), _load(r))
               for name, r in s["embedding"].items()]),
    ])


def _growth(s: dict) -> str:
    if "skipped" in s:
        return f"Skipped: {s['skipped']}."
    sizes = s["sizes"]
    counts = " / ".join(f"{z['images']:,}" for z in sizes)
    by_stage = {r["stage"]: [z["stages"][i] if i < len(z["stages"]) else None for z in sizes]
                for i, r in enumerate(sizes[0]["stages"])}

    def per_size(runs: list, key: str) -> str:
        return " / ".join("—" if r is None or r["returncode"] else _cell(r[key]) for r in runs)

    rows = [(stage, per_size(runs, "wall_seconds"), s["fits"].get(stage, {}).get("time_exponent"),
             per_size(runs, "peak_pss_tree_mib"), s["fits"].get(stage, {}).get("memory_exponent"))
            for stage, runs in by_stage.items()]
    totals = " / ".join(_cell(sum(r["wall_seconds"] for r in z["stages"])) for z in sizes)
    return "\n\n".join([
        f"Data: {s['data']}; classes capped at {' / '.join(str(z['cap'] or 'all') for z in sizes)} images "
        f"({counts} images); one epoch of each training stage, retrieval batches in proportion to the images, no "
        f"search; each stage run alone. Exponent b: cost ∝ images^b, least squares on the logs.",
        table(["stage", f"wall (s) at {counts} images", "time exponent b",
               f"peak PSS, process tree (MiB) at {counts}", "memory exponent b"],
              rows + [("**all stages**", totals, None, None, None)]),
    ])


RENDERERS: dict[str, Callable[[dict], str]] = {"extract": _extract, "decode": _decode, "train": _train, "ray": _ray, "search": _search,
                                                "shards": _shards, "pipeline": _pipeline, "accuracy": _accuracy,
                                                "growth": _growth}
