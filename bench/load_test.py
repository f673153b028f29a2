"""python -m bench.load_test --output FILE [--index LOCATION --model REF] [--requests 2000] [--concurrency 8]: a
bounded load test of the HTTP search service on loopback.

The service runs as `components.app.http.serve` runs it (uvicorn, one process) in a subprocess, over the given
index, or by default over one built from the committed sample (all 40 classes × 20 images) with ImageNet lite0 at
224 px. `requests` searches of real sample images (multipart uploads, top-k) are sent `concurrency` at a time
(httpx AsyncClient): latency percentiles, throughput, errors, and the server's RSS before and after. The limit is
the bare cost of queries in this process (decode + describe + faiss search, no HTTP; the same torch threads, and as
many at once as the server's model slots). Like the rest of the suite, the two are timed in interleaved rounds
(bare, HTTP, bare, HTTP, ...) so load that comes and goes hits both alike; rates are the rounds' medians.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import typer

from bench.measure import TreeMemory, measured, ratio
from bench.report import table

SAMPLE = Path("data/sample")
START_TIMEOUT = 300


def main(
    output: Path = typer.Option(..., help="where to write the JSON of the results"),
    index: str = typer.Option(None, help="an index location (default: one built from data/sample in a temp folder)"),
    model: str = typer.Option(None, help="the index's model: checkpoint or models:/ ref (needed with --index)"),
    image_size: int = typer.Option(224, help="the default index's ImageNet lite0 resolution"),
    requests: int = typer.Option(2000, min=1, help="HTTP searches measured, over all rounds"),
    concurrency: int = typer.Option(8, min=1),
    k: int = typer.Option(10, min=1),
    bare_queries: int = typer.Option(400, min=1, help="in-process queries timed, over all rounds"),
    rounds: int = typer.Option(10, min=1),
    warmup: int = typer.Option(32, min=0, help="requests (and bare queries) before measuring"),
    threads: int = typer.Option(os.cpu_count() or 1, min=1, help="torch/OpenMP threads, in-process and server"),
    model_slots: int = typer.Option(1, min=1, help="the server's searches at once (create_app's model_slots)"),
) -> None:
    """Load-test the search service on loopback; print a table and write the JSON."""
    if (index is None) != (model is None):
        raise typer.BadParameter("give --index and --model together (or neither: a sample index is built)")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the server inherits it
    queries = [f.read_bytes() for f in sorted(SAMPLE.glob("*/*.jpg"))]
    with tempfile.TemporaryDirectory(prefix="firesight-load-") as tmp:
        if index is None:
            index, model = _sample_index(Path(tmp), image_size)
        with measured() as record:
            record["setup"] = {"index": index, "model": model, "requests": requests, "concurrency": concurrency,
                               "k": k, "bare_queries": bare_queries, "rounds": rounds, "warmup": warmup,
                               "threads": threads, "model_slots": model_slots, "query_images": len(queries),
                               "query_source": str(SAMPLE)}
            record.update(_measure(index, model, queries, record["setup"], Path(tmp) / "server.log"))
    from bench.run import machine  # not at the top: the server process imports this module

    record["machine"] = machine()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    typer.echo(render(record))
    typer.echo(f"wrote {output}", err=True)


def _sample_index(folder: Path, image_size: int) -> tuple[str, str]:
    """An index of every committed sample image with ImageNet lite0 at `image_size`, and that model's checkpoint."""
    from components.catalog import indexing
    from components.models.net import RetrievalNet, save_checkpoint
    from components.search.index import IndexSpec

    net = RetrievalNet.create("tf_efficientnet_lite0", "gem", image_size=image_size, weights="imagenet").eval()
    save_checkpoint(folder / "model.pt", net)
    images = indexing.candidates(str(SAMPLE), "folder").images
    indexing.build(str(folder / "index"), net, images, IndexSpec(), 32)
    return str(folder / "index"), str(folder / "model.pt")


def serve_index(index: str, model: str, port: str, model_slots: str) -> None:
    """The server subprocess: the service over `index` on 127.0.0.1:`port`, run by `serve()`."""
    import torch

    from components.app.http import create_app, load_searcher, serve

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    searcher, info = load_searcher(index, model)
    serve(create_app(searcher, model_info=info, token=None, model_slots=int(model_slots)), host="127.0.0.1",
          port=int(port))


def _measure(index: str, model: str, queries: list[bytes], setup: dict[str, Any], log: Path) -> dict[str, Any]:
    import faiss
    import torch

    from components.app.http import load_searcher
    from components.data.images import decode_rgb

    threads, k, rounds = setup["threads"], setup["k"], setup["rounds"]
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    searcher, _ = load_searcher(index, model)

    def one(i: int) -> float:
        start = time.perf_counter()
        searcher.search([decode_rgb(queries[i % len(queries)])], k)
        return time.perf_counter() - start

    def bare(first: int, n: int) -> dict[str, Any]:
        """Queries first..first + n, as many at once as the server has model slots: each one's time, the wall."""
        start = time.perf_counter()
        with ThreadPoolExecutor(setup["model_slots"]) as pool:
            seconds = list(pool.map(one, range(first, first + n)))
        return {"seconds": seconds, "wall": time.perf_counter() - start}

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-c", "import sys; from bench.load_test import serve_index; "
                                   "serve_index(*sys.argv[1:])", index, model, str(port), str(setup["model_slots"])],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = _wait_up(url, server, log)
        process = psutil.Process(server.pid)
        rss_started = process.memory_info().rss
        bare(0, setup["warmup"])
        asyncio.run(_send(url, queries, k, 0, setup["warmup"], setup["concurrency"]))
        rss_before, cpu_before = process.memory_info().rss, process.cpu_times()
        bare_rounds, http_rounds, client_cpu = [], [], 0.0
        with TreeMemory(server.pid) as memory:
            for r in range(rounds):  # interleaved: load from elsewhere hits both alike
                n_bare, n_http = _share(setup["bare_queries"], rounds, r), _share(setup["requests"], rounds, r)
                bare_rounds.append(bare(r * n_bare, n_bare))
                client = psutil.Process().cpu_times()
                http_rounds.append(asyncio.run(_send(url, queries, k, r * n_http, n_http, setup["concurrency"])))
                client_cpu += _cpu_seconds(psutil.Process().cpu_times()) - _cpu_seconds(client)
        rss_after, cpu_after = process.memory_info().rss, process.cpu_times()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: uvicorn and anything it started
        server.wait(30)
    seconds = [s for r in bare_rounds for s in r["seconds"]]
    latencies = np.asarray([s for r in http_rounds for s in r["seconds"]]) * 1000
    took = [t for r in http_rounds for t in r["took_ms"]]
    statuses = sum((Counter(r["statuses"]) for r in http_rounds), Counter())
    bare_rate, http_rate = (statistics.median(_rates(rounds)) for rounds in (bare_rounds, http_rounds))
    return {
        "server_start_seconds": round(started, 1),
        "bare": {"queries": len(seconds), "index_count": len(searcher.index.entries),
                 "model": searcher.index.model["arch"], "image_size": searcher.index.model["image_size"],
                 "ms_p50": _ms(np.percentile(seconds, 50)), "ms_mean": _ms(statistics.fmean(seconds)),
                 "queries_per_s": round(bare_rate, 2),
                 "rates": _rates(bare_rounds)},
        "http": {"requests": len(latencies), "errors": sum(r["errors"] for r in http_rounds),
                 "statuses": dict(statuses), "throughput_per_s": round(http_rate, 2),
                 "rates": _rates(http_rounds),
                 **{f"latency_ms_p{q}": round(float(np.percentile(latencies, q)), 1) for q in (50, 95, 99)},
                 "latency_ms_max": round(float(latencies.max()), 1),
                 "server_took_ms_p50": round(statistics.median(took), 2) if took else None,
                 "server_cpu_ms_per_request": _ms((_cpu_seconds(cpu_after) - _cpu_seconds(cpu_before))
                                                  / len(latencies)),
                 "client_cpu_ms_per_request": _ms(client_cpu / len(latencies))},
        "ratio_to_bare": ratio(http_rate, bare_rate),
        "server_rss_mib": {"started": _mib(rss_started), "before": _mib(rss_before), "after": _mib(rss_after),
                           "peak": memory.summary()["peak_rss_largest_process_mib"],
                           "growth": _mib(rss_after - rss_before)},
    }


def _rates(rounds: list[dict[str, Any]]) -> list[float]:
    return [round(len(r["seconds"]) / r["wall"], 2) for r in rounds]


def _share(total: int, rounds: int, r: int) -> int:
    """Round r's part of `total` (the first rounds take the remainder)."""
    return total // rounds + (r < total % rounds)


def _wait_up(url: str, server: subprocess.Popen, log: Path) -> float:
    start = time.monotonic()
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if time.monotonic() - start > START_TIMEOUT:
            raise RuntimeError(f"the server was not up after {START_TIMEOUT} s: {log.read_text()[-3000:]}")
        time.sleep(0.5)


async def _send(url: str, queries: list[bytes], k: int, first: int, n: int, concurrency: int) -> dict[str, Any]:
    """Searches of queries[first:first + n] (cycling), `concurrency` in flight at a time: each one's latency and
    server took_ms, the statuses, the errors (any answer but 200 with k results) and the wall time."""
    seconds: list[float] = []
    took_ms: list[float] = []
    statuses: Counter[str] = Counter()
    numbers = itertools.count(first)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker() -> None:
            while (i := next(numbers)) < first + n:
                start = time.perf_counter()
                try:
                    answer = await client.post("/search", data={"k": str(k)},
                                               files={"image": ("query.jpg", queries[i % len(queries)], "image/jpeg")})
                    if answer.status_code == 200 and len(answer.json()["results"]) == k:
                        statuses["200"] += 1
                        took_ms.append(answer.json()["took_ms"])
                    else:
                        statuses["200 (fewer results)" if answer.status_code == 200 else str(answer.status_code)] += 1
                except httpx.HTTPError as e:
                    statuses[type(e).__name__] += 1
                seconds.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"seconds": seconds, "took_ms": took_ms, "statuses": dict(statuses),
            "errors": n - statuses.get("200", 0), "wall": wall}


def _ms(seconds: float) -> float:
    return round(float(seconds) * 1000, 2)


def _cpu_seconds(times: Any) -> float:
    return times.user + times.system


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def render(r: dict[str, Any]) -> str:
    s, b, h, m = r["setup"], r["bare"], r["http"], r["server_rss_mib"]
    return "\n\n".join([
        f"{h['requests']:,} searches (top-{s['k']}, multipart uploads of {s['query_images']} real sample images), "
        f"{s['concurrency']} in flight, on loopback, in {s['rounds']} rounds interleaved with {b['queries']} bare "
        f"queries; index of {b['index_count']:,} images, {b['model']} at {b['image_size']} px, {s['threads']} torch "
        f"thread(s), {s['model_slots']} model slot(s); load average {r['loadavg_start'][0]:.1f} → "
        f"{r['loadavg_end'][0]:.1f}, {r['started']}.",
        table(["measure", "value"], [
            ("errors", h["errors"]),
            ("throughput (requests/s, median of rounds)", h["throughput_per_s"]),
            ("latency p50 / p95 / p99 / max (ms)",
             f"{h['latency_ms_p50']} / {h['latency_ms_p95']} / {h['latency_ms_p99']} / {h['latency_ms_max']}"),
            ("server took_ms p50 (decode to answer, waiting for the model included)", h["server_took_ms_p50"]),
            ("server CPU per request (ms)", h["server_cpu_ms_per_request"]),
            ("bare query in-process: decode + describe + faiss, p50 / mean (ms)", f"{b['ms_p50']} / {b['ms_mean']}"),
            ("bare limit (queries/s in-process, as many at once as model slots; median of rounds)",
             b["queries_per_s"]),
            ("HTTP throughput / bare limit", r["ratio_to_bare"]),
            ("server RSS MiB: started / after warm-up / after / peak",
             f"{m['started']} / {m['before']} / {m['after']} / {m['peak']}"),
            ("server RSS growth over the run (MiB)", m["growth"]),
            ("load client CPU per request (ms, on the same cores)", h["client_cpu_ms_per_request"]),
            ("server start (s)", r["server_start_seconds"]),
        ]),
    ])


if __name__ == "__main__":
    typer.run(main)
