"""python -m bench [--quick] [--sections extract,train,...] [--full-data]: run the benchmark suite, write
bench/results/<date>-<mode>.json and the markdown tables beside it (.md)."""

from __future__ import annotations

import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
import typer

from bench import accuracy, decode, extract, growth, pipeline, ray_overhead, search, shards, train
from bench.measure import load_average, now
from bench.report import render
from pipelines.common import git_commit

SECTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "extract": extract.run, "decode": decode.run, "train": train.run, "ray": ray_overhead.run, "search": search.run, "shards": shards.run,
    "pipeline": pipeline.run, "accuracy": accuracy.run, "growth": growth.run,
}
RESULTS_DIR = Path("bench/results")
VERSIONS = ("torch", "timm", "faiss-cpu", "ray", "mlflow", "dvc", "numpy")


def main(
    quick: bool = typer.Option(False, "--quick", help="small sizes: the whole suite in under 10 minutes"),
    sections: str = typer.Option(",".join(SECTIONS), help=f"comma-separated, in this order by default: {','.join(SECTIONS)}"),
    full_data: bool = typer.Option(False, "--full-data",
                                   help="pipeline section on the full Caltech-101 (configs/caltech101-full.yaml)"),
    out: Path = typer.Option(RESULTS_DIR, help="folder for the .json and .md"),
) -> None:
    """Firesight's benchmark suite: writes a JSON of results and its markdown tables (see BENCHMARKS.md)."""
    chosen = [s.strip() for s in sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise typer.BadParameter(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}", param_hint="--sections")

    mode = "quick" if quick else "full"
    stem = "-".join([time.strftime("%Y-%m-%d"), mode] + (["full-data"] if full_data else [])
                    + ([] if chosen == list(SECTIONS) else ["+".join(chosen)]))
    results: dict[str, Any] = {"mode": mode, "command": " ".join(["python -m bench", *sys.argv[1:]]),
                               "git_commit": git_commit(), "machine": machine(), "started": now(),
                               "loadavg_start": load_average(), "sections": {}}
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        typer.echo(f"bench: {name} ({mode}) ...", err=True)
        section_start = time.perf_counter()
        try:
            kwargs = ({"full_data": full_data} if name == "pipeline"
                      else {"pipeline": results["sections"].get("pipeline")} if name == "accuracy" else {})
            results["sections"][name] = SECTIONS[name](mode, **kwargs)
        except Exception as e:  # one broken section must not lose the others' results
            results["sections"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        results["sections"][name]["section_seconds"] = round(time.perf_counter() - section_start, 1)
        typer.echo(f"bench: {name} done in {results['sections'][name]['section_seconds']:.0f} s", err=True)
        _write(results | {"ended": now(), "loadavg_end": load_average(), "wall_seconds": time.perf_counter() - start},
               out / stem)
    typer.echo(f"bench: wrote {out / stem}.json and .md", err=True)


def _write(results: dict[str, Any], stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    stem.with_suffix(".md").write_text(render(results))


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    return {"cpu": cpu, "cores": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version(),
            "versions": {name: version(name) for name in VERSIONS}}


if __name__ == "__main__":
    typer.run(main)
