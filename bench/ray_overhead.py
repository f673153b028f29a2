"""Ray's own cost: a cold local `ray.init` (through `ensure_ray`, as the stages start it), a trivial training job
through `run_training` on 1 and 2 workers against the same loop run bare, and what an idle local Ray's system
processes (GCS, raylet, dashboard and its agents, idle workers) take in CPU and memory — as `ensure_ray` starts it
(with the dashboard Ray Train's state API needs) and without the dashboard. Each measured in a fresh process
(`python -m bench.ray_overhead [--idle-without-dashboard]` prints the JSON), so that no Ray is already running in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.nn.parallel import DistributedDataParallel

from components.training.context import BEST_MODEL_FILE, LocalContext, WorkerContext, write_history

STEPS = 50
IDLE_SECONDS = {"quick": 5, "full": 30}


def run(mode: str) -> dict[str, Any]:
    out = _in_fresh_process(str(IDLE_SECONDS[mode]))
    out["idle_without_dashboard"] = _in_fresh_process(str(IDLE_SECONDS[mode]), "--idle-without-dashboard")
    return out


def _in_fresh_process(*args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray, started cold
    proc = subprocess.run([sys.executable, "-m", "bench.ray_overhead", *args], env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def idle_cost(seconds: float) -> dict[str, Any]:
    """CPU (percent of one core, averaged over `seconds`) and memory (PSS) of this process's descendants — the
    local Ray's system processes and idle workers — grouped by process name, while nothing runs."""
    processes = psutil.Process().children(recursive=True)
    for p in processes:
        p.cpu_percent(None)
    time.sleep(seconds)
    by_name: dict[str, dict[str, float]] = {}
    for p in processes:
        try:
            cpu, pss, name = p.cpu_percent(None), p.memory_full_info().pss, p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        row = by_name.setdefault(name, {"processes": 0, "cpu_percent": 0.0, "pss_mib": 0.0})
        row["processes"] += 1
        row["cpu_percent"] = round(row["cpu_percent"] + cpu, 1)
        row["pss_mib"] = round(row["pss_mib"] + pss / 2**20, 1)
    return {"seconds": seconds, "by_process": dict(sorted(by_name.items(), key=lambda kv: -kv[1]["pss_mib"])),
            "cpu_percent": round(sum(r["cpu_percent"] for r in by_name.values()), 1),
            "pss_mib": round(sum(r["pss_mib"] for r in by_name.values()), 1)}


def trivial_loop(steps: int, ctx: WorkerContext) -> None:
    """`steps` SGD steps of a 16→1 linear model on random data, then one report with a tiny checkpoint."""
    torch.manual_seed(ctx.rank)
    model = torch.nn.Linear(16, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ddp = DistributedDataParallel(model) if ctx.world_size > 1 else model
    for _ in range(steps):
        loss = ddp(torch.randn(32, 16)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def write(folder: Path) -> None:
        torch.save(model.state_dict(), folder / BEST_MODEL_FILE)
        write_history(folder, [{"epoch": 1, "loss": float(loss)}])

    ctx.report({"epoch": 1}, write if ctx.rank == 0 else None)


def _measure(idle_seconds: float) -> dict[str, Any]:
    import ray

    from bench.measure import measured
    from components.distributed import Cluster, ensure_ray, run_training

    out: dict[str, Any] = {"steps": STEPS}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        with measured() as out["bare_loop"]:
            trivial_loop(STEPS, LocalContext(Path(tmp) / "local"))
        with measured() as out["ray_init"]:
            ensure_ray()
        out["idle"] = idle_cost(idle_seconds)
        for workers in (1, 2):
            cluster = Cluster(workers, 1, False, str(Path(tmp) / "ray"))
            with measured() as out[f"job_{workers}_worker"]:
                run_training(trivial_loop, STEPS, name="bench-trivial", cluster=cluster,
                             output_dir=Path(tmp) / f"model{workers}")
        with measured() as out["ray_shutdown"]:
            ray.shutdown()
    bare = out["bare_loop"]["wall_seconds"]
    out["overhead_seconds"] = {"ray_init": out["ray_init"]["wall_seconds"],
                               **{f"job_{w}_worker": round(out[f"job_{w}_worker"]["wall_seconds"] - bare, 3) for w in (1, 2)}}
    return out


def _idle_without_dashboard(idle_seconds: float) -> dict[str, Any]:
    import components  # noqa: F401  (before ray: a local Ray on loopback)
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        return idle_cost(idle_seconds)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else IDLE_SECONDS["full"]
    print(json.dumps(_idle_without_dashboard(seconds) if "--idle-without-dashboard" in sys.argv else _measure(seconds)))
