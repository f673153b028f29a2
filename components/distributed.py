"""Ray Train integration: run a training loop (components.training.classify, .retrieval) as a TorchTrainer job.

DDP on gloo for CPU workers and nccl when GPUs are used; one checkpoint per epoch (the latest is kept, it holds
the best model so far); a worker that dies is restarted from the latest checkpoint (`max_failures`). Rank 0's
progress reaches the driver through a Ray queue and shows as a bar per epoch on the terminal (`sys.__stderr__`: a
stage's runner may send `sys.stderr` to its log file).
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch.distributed import TCPStore
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Empty, Queue
from tqdm import tqdm

import components
from components.errors import FiresightError
from components.redact import redact
from components.storage import arrow_filesystem, remove_tree
from components.training.context import BEST_MODEL_FILE, HISTORY_FILE, read_train_state

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
LOCAL_START_ATTEMPTS = 3


class TrainingFailed(FiresightError):
    pass


@dataclass(frozen=True)
class Cluster:
    """Where and how wide a training job runs."""

    num_workers: int = 2
    cpus_per_worker: int = 1
    use_gpu: bool = False
    storage_path: str = ".ray_results"  # a folder or an s3:// prefix (checkpoints while a job runs)
    max_failures: int = 1
    reserved_cpus_per_worker: float | None = None  # Ray's CPU reservation; None: cpus_per_worker (the torch threads)
    address: str | None = None  # a Ray cluster to join (RAY_ADDRESS overrides); None: a private local Ray


@dataclass(frozen=True)
class _Step:
    """Rank 0 after a training step: steps done of the epoch's total, running mean loss."""

    epoch: int
    step: int
    steps: int
    loss: float


class RayWorkerContext:
    """WorkerContext backed by ray.train (rank, device, checkpoints); rank 0 puts its progress (steps, then each
    epoch's metrics) into `progress` when given."""

    def __init__(self, progress: Queue | None = None) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self._progress = progress if self.rank == 0 else None

    def progress(self, epoch: int, step: int, steps: int, loss: float) -> None:
        if self._progress is not None:
            self._progress.put(_Step(epoch, step, steps, loss))

    def restored_state(self) -> dict[str, Any] | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return read_train_state(Path(folder))

    def report(self, metrics: dict[str, float], write_checkpoint: Callable[[Path], None] | None) -> None:
        if write_checkpoint is None:
            ray.train.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as folder:
                write_checkpoint(Path(folder))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
        if self._progress is not None:
            self._progress.put(dict(metrics))


def _listen_on_master_addr() -> None:
    """In a Train worker, before its process group is set up: rank 0's rendezvous store (torch's TCPStore) will
    listen on MASTER_ADDR only — the node's address, 127.0.0.1 on a private local Ray — where torch's own listens
    on every interface."""
    rendezvous = importlib.import_module("torch.distributed.rendezvous")  # the module (an attribute: a function)
    create = rendezvous._create_c10d_store

    def create_store(hostname: str, port: int, rank: int, world_size: int, timeout, use_libuv: bool = True):
        if rank != 0 or rendezvous._agent_store_serves(hostname, port):
            return create(hostname, port, rank, world_size, timeout, use_libuv)
        family = socket.AF_INET6 if ipaddress.ip_address(hostname).version == 6 else socket.AF_INET
        listener = socket.create_server((hostname, port), family=family)
        return TCPStore(hostname, port, world_size, True, timeout, multi_tenant=True, use_libuv=use_libuv,
                        master_listen_fd=listener.detach())

    rendezvous._create_c10d_store = create_store


class _TorchBackend(ray.train.torch.config._TorchBackend):
    """Ray's torch backend, with the rendezvous store on MASTER_ADDR only (`_listen_on_master_addr`)."""

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        worker_group.execute(_listen_on_master_addr)
        super().on_start(worker_group, backend_config)


@dataclass
class _TorchConfig(TorchConfig):
    """Ray's TorchConfig with `_TorchBackend`."""

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _TorchBackend


def _worker_entry(config: dict[str, Any]) -> None:
    torch.set_num_threads(config["threads"])
    config["loop"](config["job"], RayWorkerContext(config["progress"]))


class _EpochBars:
    """Rank 0's progress on the terminal: a bar per epoch (steps, running loss) that ends with the epoch's val
    metrics; an epoch without training steps (epoch 0: the starting point) is one line."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar: tqdm | None = None
        self.epoch = -1

    def show(self, event: _Step | dict[str, float]) -> None:
        if isinstance(event, _Step):
            if self.bar is None or event.epoch != self.epoch or event.step < self.bar.n:  # a restarted worker redoes it
                self.close()
                self.bar = tqdm(total=event.steps, desc=f"{self.name} epoch {event.epoch}", unit="step",
                                file=sys.__stderr__, dynamic_ncols=True)
                self.epoch = event.epoch
            self.bar.set_postfix(loss=f"{event.loss:.4f}", refresh=False)
            self.bar.update(event.step - self.bar.n)
            return
        scores = {k: f"{v:.4f}" for k, v in event.items() if k.startswith("val_")}
        if self.bar is not None and int(event["epoch"]) == self.epoch:
            self.bar.set_postfix(loss=f"{event['train_loss']:.4f}", **scores, refresh=False)
            self.close()
        else:
            tqdm.write(f"{self.name} epoch {int(event['epoch'])}: " + ", ".join(f"{k}={v}" for k, v in scores.items()),
                       file=sys.__stderr__)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextmanager
def _progress_relay(name: str) -> Iterator[Queue]:
    """A queue (a Ray actor) for rank 0's progress, drained into `_EpochBars` by a driver thread while the job runs:
    Train's controller is an actor, so the driver sees nothing of a running job otherwise."""
    queue = Queue()
    bars = _EpochBars(name)
    finished = threading.Event()

    def drain() -> None:
        while True:
            try:
                bars.show(queue.get(timeout=0.5))
            except Empty:
                if finished.is_set():  # every put happened before the job ended
                    return

    thread = threading.Thread(target=drain, name="firesight-progress", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        finished.set()
        thread.join(timeout=10)
        bars.close()
        queue.shutdown()


def gpu_available(choice: str) -> bool:
    """'yes' | 'no' | 'auto' (use GPUs when torch sees one)."""
    if choice == "auto":
        return torch.cuda.is_available()
    return choice == "yes"


def ensure_ray(address: str | None = None, *, forward_logs: bool = True) -> None:
    """Join the cluster at RAY_ADDRESS, else at `address`, when one is set (workers import this checkout's code when
    they see the same path, e.g. a shared volume); else start a private local Ray — never one a `ray start` left on
    this machine — whose every server (GCS, raylet, workers, agents and the dashboard Ray Train's state API needs)
    listens on 127.0.0.1 only. One log line says which. `forward_logs`: Ray copies its workers' and servers' output
    to this process's stderr (a stage's log file); off, it stays in Ray's session folder. The first call decides."""
    if ray.is_initialized():
        return
    ray_logger = logging.getLogger("ray")  # Ray's own handler writes to the stderr of import time: log through ours
    for handler in ray_logger.handlers[:]:
        ray_logger.removeHandler(handler)
    ray_logger.propagate = True
    # workers run in Ray's own folders: make them import this checkout's code, the same the driver runs; on a
    # busy small machine a worker can take minutes to start, past Ray Train's 60 s default
    code = {"env_vars": {"PYTHONPATH": str(Path(components.__file__).resolve().parent.parent),
                         WORKER_START_TIMEOUT: os.environ.get(WORKER_START_TIMEOUT, "600")}}
    cluster = os.environ.get("RAY_ADDRESS") or address
    if cluster:
        ray.init(address=cluster, log_to_driver=forward_logs, runtime_env=code)
        log.info("Ray: joined the cluster at %s", redact(cluster))
        return
    node_ip = ray.util.get_node_ip_address()  # before init: the IP a local node would take
    if not ipaddress.ip_address(node_ip).is_loopback:
        raise RuntimeError(f"a local Ray would listen on {node_ip}, not loopback: ray was imported before the "
                           "components package (import it first, or set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)")
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=forward_logs,
                     runtime_env=code)
            break
        except Exception as e:  # Ray gives its raylet and dashboard fixed start-up times a busy machine can miss
            ray.shutdown()
            if attempt == LOCAL_START_ATTEMPTS:
                raise
            log.warning("local Ray did not start (attempt %d of %d: %s); starting it again", attempt,
                        LOCAL_START_ATTEMPTS, root_cause(e)[:200])
    log.info("Ray: private local Ray on 127.0.0.1 (%g CPUs)", ray.cluster_resources().get("CPU", 0))


def torch_trainer(loop: Callable[[Any, Any], None], job: Any, *, run_name: str, cluster: Cluster,
                  callbacks: list | None = None, progress: Queue | None = None) -> TorchTrainer:
    """A TorchTrainer that runs `loop(job, ctx)` on `cluster.num_workers` workers (gloo on CPU, nccl on GPU),
    keeps the latest per-epoch checkpoint (under `cluster.storage_path`, a folder or s3:// prefix) and restarts
    failed workers from it; rank 0 puts its progress into `progress` when given."""
    filesystem, storage_path = arrow_filesystem(cluster.storage_path)
    return TorchTrainer(
        _worker_entry,
        train_loop_config={"loop": loop, "job": job, "threads": cluster.cpus_per_worker, "progress": progress},
        torch_config=_TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cluster.num_workers,
            use_gpu=cluster.use_gpu,
            resources_per_worker={"CPU": cluster.reserved_cpus_per_worker or cluster.cpus_per_worker,
                                  **({"GPU": 1} if cluster.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            callbacks=callbacks,
        ),
    )


def fit(trainer: TorchTrainer, run_name: str) -> ray.train.Result:
    """trainer.fit() with a worker's failure surfaced as one line."""
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker exceptions; surface the root cause in one line
        raise TrainingFailed(f"training job {run_name} failed: {root_cause(e)}") from None
    if result.checkpoint is None:
        raise TrainingFailed(f"training job {run_name} finished without a checkpoint")
    return result


def run_training(loop: Callable[[Any, Any], None], job: Any, *, name: str, cluster: Cluster, output_dir: Path) -> Path:
    """Run `loop(job, ctx)` on `cluster.num_workers` Ray Train workers, showing rank 0's progress as a bar per
    epoch named `name`; copy the best model and the metric history of the final checkpoint into `output_dir`
    (replacing it whole) and return it."""
    ensure_ray(cluster.address)
    run_name = f"{name}-{uuid.uuid4().hex[:8]}"  # a reused name would resume an old run
    log.info("Ray Train job %s: %d worker(s), %s", run_name, cluster.num_workers, "nccl/GPU" if cluster.use_gpu else "gloo/CPU")
    with _progress_relay(name) as progress:
        result = fit(torch_trainer(loop, job, run_name=run_name, cluster=cluster, progress=progress), run_name)
    output_dir = Path(output_dir)
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with result.checkpoint.as_directory() as folder:
        for name in (BEST_MODEL_FILE, HISTORY_FILE):
            shutil.copy2(Path(folder) / name, tmp / name)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(tmp, output_dir)
    remove_tree(f"{cluster.storage_path.rstrip('/')}/{run_name}")
    return output_dir


def root_cause(e: BaseException) -> str:
    """One line naming the exception that started it all, through Ray's wrappers (a failed worker of a worker
    group, a remote task's error) and chained causes."""
    while True:
        failures = getattr(e, "worker_failures", None)
        if failures:
            e = failures[min(failures)]
        elif isinstance(getattr(e, "cause", None), BaseException):
            e = e.cause
        elif e.__cause__ is not None:
            e = e.__cause__
        else:
            break
    message = next((line for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {message}"
