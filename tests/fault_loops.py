"""Training loops with injected faults, run by Ray Train workers in tests (importable as tests.fault_loops, so
workers can unpickle them)."""

import itertools
import json
import os
import signal
import time
from pathlib import Path

from components.training.jobs import RetrievalJob
from components.training.retrieval import train_retrieval

KILL_IN_EPOCH = 2


class _Recording:
    """A WorkerContext that appends every epoch this worker reports to `log`."""

    def __init__(self, ctx, log: Path) -> None:
        self.ctx, self.log = ctx, log
        self.rank, self.world_size, self.device = ctx.rank, ctx.world_size, ctx.device
        self.last_reported: int | None = None

    def restored_state(self):
        return self.ctx.restored_state()

    def progress(self, epoch, step, steps, loss) -> None:
        self.ctx.progress(epoch, step, steps, loss)

    def report(self, metrics, write_checkpoint) -> None:
        self.ctx.report(metrics, write_checkpoint)
        self.last_reported = int(metrics["epoch"])
        with open(self.log, "a") as f:
            f.write(f"{self.last_reported}\n")


def _wait_for_registered_checkpoint(storage: Path, epoch: int, timeout: float = 120) -> None:
    """Until Ray Train's controller has recorded the checkpoint of `epoch` as the latest (its snapshot file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            if latest.get("metrics", {}).get("epoch") == epoch:
                return
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint of epoch {epoch} registered under {storage}")


def loop_killed_once(job: RetrievalJob, ctx) -> None:
    """train_retrieval on Ray Train workers; rank 1 SIGKILLs its own process at its third image load of epoch
    KILL_IN_EPOCH (mid-epoch, after the previous epoch's checkpoint is registered) — the first time only."""
    folder = Path(job.audit_dir).parent
    recording = _Recording(ctx, folder / f"reports-rank{ctx.rank}.txt")
    marker = folder / "killed"
    if ctx.rank == 1 and not marker.exists():
        import components.data.datasets as datasets

        load_rgb, loads = datasets.load_rgb, itertools.count()

        def load_then_die(uri, *args, **kwargs):
            if recording.last_reported == KILL_IN_EPOCH - 1 and next(loads) == 2:
                _wait_for_registered_checkpoint(folder / "ray", KILL_IN_EPOCH - 1)
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return load_rgb(uri, *args, **kwargs)

        datasets.load_rgb = load_then_die
    train_retrieval(job, recording)
