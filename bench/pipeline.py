"""Pipeline: wall time and peak memory of each DVC stage, each run alone (`dvc repro -s <stage>`, stages in the
order dvc.yaml's dependencies give) in a fresh clone of this checkout; then a no-op `dvc repro`.

Memory is that of the stage's whole process tree (`TreeMemory`: summed RSS polled every 0.5 s, and PSS at its
peaks): dvc, the stage's Python, and, for the training stages, the local Ray node the stage starts (gcs, raylet)
with the Ray Train workers the raylet starts, all descendants of the stage's process (RAY_ADDRESS is cleared so
that Ray starts locally rather than joining a cluster whose workers would escape the count).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.measure import TreeMemory, goal, measured
from pipelines.params import merge_overrides, read_overrides

GOAL_NOOP_SECONDS = 15.0
FULL_DATA_CONFIG = Path("configs/caltech101-full.yaml")
NO_SEARCH = {"tune": {"search": "off"}}  # the margin search alone is measured by the tune stage of a default run
QUICK_OVERRIDES = {"ingest": {"max_images_per_class": 8}, "classify": {"epochs": 1}, "retrieval": {"epochs": 1},
                   **NO_SEARCH}
OUTPUT_TAIL = 2000


class RepoCopy:
    """A clone of this checkout (its commit plus uncommitted changes) in a temporary folder, with its own
    params.yaml, where dvc runs as a user would run it."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-repo-"))
        self.root = self.tmp / "repo"
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", ".", str(self.root)], check=True)
        changed = subprocess.run(["git", "ls-files", "-m", "-o", "--exclude-standard"], check=True,
                                 capture_output=True, text=True).stdout.split()
        for name in changed:
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(name, self.root / name)
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTHONPATH")}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"

    def write_params(self, params: dict[str, Any]) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def run(self, args: list[str]) -> dict[str, Any]:
        """Run a command in the copy; its wall time, peak tree memory, exit code and the tail of its output."""
        with measured() as record:
            proc = subprocess.Popen(args, cwd=self.root, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            with TreeMemory(proc.pid) as memory:
                output, _ = proc.communicate()
        record.update(command=" ".join(args), returncode=proc.returncode, **memory.summary())
        if proc.returncode:
            record["output_tail"] = output[-OUTPUT_TAIL:]
        return record

    def stages(self) -> dict[str, dict]:
        return yaml.safe_load((self.root / "dvc.yaml").read_text())["stages"]

    def read_metrics(self, name: str) -> dict:
        """A JSON metrics file of the copy; {} when it is absent."""
        path = self.root / name
        return json.loads(path.read_text()) if path.is_file() else {}


def pipeline_params(full_data: bool, overrides: dict[str, dict]) -> dict[str, Any]:
    """params.yaml (or the full Caltech-101 config, its source made absolute) with `overrides` merged in."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    if full_data:
        params = merge_overrides(params, read_overrides(FULL_DATA_CONFIG))
        params["ingest"]["source"] = str(Path(params["ingest"]["source"]).resolve())
    for section, values in overrides.items():
        params[section] = {**params[section], **values}
    return params


def stage_order(stages: dict[str, dict]) -> list[str]:
    """Stages sorted so that each comes after the stages whose outputs it depends on (dvc.yaml order breaks ties)."""
    outs = {name: [_path(o) for o in spec.get("outs", [])] for name, spec in stages.items()}

    def upstream(name: str) -> set[str]:
        deps = [_path(d) for d in stages[name].get("deps", [])]
        return {other for other, paths in outs.items() if other != name
                and any(d == p or d.startswith(p.rstrip("/") + "/") or p.startswith(d.rstrip("/") + "/")
                        for d in deps for p in paths)}

    ordered: list[str] = []
    pending = list(stages)
    while pending:
        ready = next((s for s in pending if upstream(s) <= set(ordered)), None)
        if ready is None:
            raise ValueError(f"dvc.yaml: stages {pending} depend on each other in a cycle")
        ordered.append(ready)
        pending.remove(ready)
    return ordered


def _path(entry: str | dict) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


def _metrics_file(spec: dict) -> str | None:
    files = [_path(m) for m in spec.get("metrics", [])]
    return files[0] if files else None


def run(mode: str, full_data: bool = False) -> dict[str, Any]:
    # the default sample run as `dvc repro` runs it; on the full data the 9-trial search (hours) is left out
    overrides = QUICK_OVERRIDES if mode == "quick" else NO_SEARCH if full_data else {}
    copy = RepoCopy()
    try:
        copy.write_params(pipeline_params(full_data, overrides))
        rows = run_stages(copy)
        noop = copy.run(["dvc", "repro"]) if all(r["returncode"] == 0 for r in rows) else None
        results = copy.read_metrics("metrics.json")
    finally:
        copy.close()
    out: dict[str, Any] = {
        "data": "full Caltech-101 (configs/caltech101-full.yaml)" if full_data else "sample (params.yaml)",
        "overrides": overrides,
        "stages": rows,
        "total_seconds": round(sum(r["wall_seconds"] for r in rows), 1),
        "noop_repro": noop,
        "model": pipeline_params(full_data, overrides)["model"],
        **headline_maps(results),
        "goals": [],
    }
    if noop is not None:
        out["goals"].append(goal("pipeline: no-op `dvc repro`", noop["wall_seconds"], GOAL_NOOP_SECONDS, unit=" s",
                                 higher_is_better=False))
    return out


def run_stages(copy: RepoCopy) -> list[dict[str, Any]]:
    """Each stage of the copy's dvc.yaml run alone (`dvc repro -s`), in dependency order, until one fails: its wall
    time and tree memory, and its own clock (`wall_seconds` of its metrics file) where it has one."""
    stages = copy.stages()
    rows = []
    for name in stage_order(stages):
        record = copy.run(["dvc", "repro", "-s", name])
        metrics_file = _metrics_file(stages[name])
        fresh = metrics_file and record["returncode"] == 0  # a failed stage leaves the committed file
        in_stage = copy.read_metrics(metrics_file).get("wall_seconds") if fresh else None
        rows.append({"stage": name, "in_stage_seconds": in_stage, **record})
        if record["returncode"]:
            break
    return rows


def headline_maps(metrics: dict) -> dict[str, float | None]:
    """The leave-one-out test mAP of the full pipeline and of the off-the-shelf network in evaluate's metrics.json
    (None where a failed run left none)."""
    def loo(summary: dict | None) -> float | None:
        return ((summary or {}).get("leave_one_out") or {}).get("map", {}).get("value")

    return {"test_map": loo(metrics.get("test")), "off_the_shelf_map": loo(metrics.get("baselines", {}).get("off-the-shelf"))}
