"""Ray start-up overhead: a cold local `ray.init` (through `ensure_ray`, as the training stages start it), and a
trivial training job through `run_training` on 1 and 2 workers against the same loop run bare. Measured in a fresh
process (`python -m bench.ray_overhead` prints the JSON), so that no Ray is already running in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from components.training.context import BEST_MODEL_FILE, LocalContext, WorkerContext, write_history

STEPS = 50


def run(mode: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray, started cold
    proc = subprocess.run([sys.executable, "-m", "bench.ray_overhead"], env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def _measure() -> dict[str, Any]:
    import ray

    from bench.measure import measured
    from components.distributed import Cluster, ensure_ray, run_training

    out: dict[str, Any] = {"steps": STEPS}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        with measured() as out["bare_loop"]:
            trivial_loop(STEPS, LocalContext(Path(tmp) / "local"))
        with measured() as out["ray_init"]:
            ensure_ray()
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


if __name__ == "__main__":
    print(json.dumps(_measure()))
