"""Training step: samples/s of the retrieval stage's loop under Ray Train (`run_training(train_retrieval, ...)`, the
path the stage takes) against a bare PyTorch loop with the same model, pairs, transforms, optimiser and threads;
and 2 workers against 1.

Firesight's rate is timed inside the workers, between the reports of epoch 0 and of the last epoch: it includes
each epoch's checkpoint and its (tiny) validation, not Ray's start-up, which is reported apart as the job's wall
time."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch.utils.data import DataLoader

from bench.data import real_images
from bench.measure import goal, measured, ratio
from components.data.datasets import PairDataset
from components.data.samplers import draw_random_pairs
from components.data.transforms import PairBatchTransform
from components.distributed import Cluster, ensure_ray, run_training
from components.losses import LOSSES
from components.losses.pairs import pair_tuple
from components.models.net import freeze_batchnorm_statistics
from components.registry import Spec
from components.training.jobs import LabelledImages, RetrievalJob, RetrievalValSet
from components.training.retrieval import train_retrieval
from pipelines.common import net_spec, optimisation
from pipelines.params import load_params

GOAL_RATIO = 0.85
SIZES = {"quick": {"classes": 8, "per_class": 8, "pairs_per_class": 4, "epochs": 2, "threads": (1,)},
         "full": {"classes": 16, "per_class": 12, "pairs_per_class": 8, "epochs": 3, "threads": (1, 2)}}
VAL_CLASSES, VAL_PER_CLASS = 2, 3  # a tiny validation set: each epoch's val mAP costs little


def run(mode: str) -> dict[str, Any]:
    size = SIZES[mode]
    job = _job(size)
    samples = 2 * len(_pairs(job))  # images per epoch: two per pair
    runs: list[dict[str, Any]] = []
    ensure_ray()
    try:
        for threads in size["threads"]:
            runs.append(_bare(job, threads, samples))
            runs.append(_firesight(job, Cluster(1, threads, False), samples))
            if threads == 1:
                runs.append(_firesight(job, Cluster(2, 1, False), samples))
            runs.append(_bare(job, threads, samples))  # bare again: the Ray runs sit between two bare ones
    finally:
        ray.shutdown()

    def rate(path: str, workers: int, threads: int) -> float:
        rates = [r["samples_per_s"] for r in runs if (r["path"], r["workers"], r["threads"]) == (path, workers, threads)]
        return round(float(np.mean(rates)), 3)

    one_worker = ratio(rate("firesight", 1, 1), rate("bare", 1, 1))
    scaling = ratio(rate("firesight", 2, 1), rate("firesight", 1, 1))
    return {
        "setup": {"images": len(job.train.uris), "classes": size["classes"], "pairs_per_epoch": samples // 2,
                  "samples_per_epoch": samples, "epochs": size["epochs"], "batch_size_pairs": job.optim.batch_size,
                  "model": job.net.arch, "frozen_stages": job.net.frozen_stages, "train_max_side": job.optim.train_max_side},
        "runs": runs,
        "ratio_1_worker_vs_bare": one_worker,
        "scaling_2_workers_vs_1": scaling,
        **({"ratio_1_worker_2_threads_vs_bare": ratio(rate("firesight", 1, 2), rate("bare", 1, 2))}
           if 2 in size["threads"] else {}),
        "goals": [goal("training: Ray Train, 1 worker vs bare PyTorch", one_worker, GOAL_RATIO)],
    }


def _job(size: dict) -> RetrievalJob:
    params = load_params()
    train = real_images(per_class=size["per_class"], classes=size["classes"])
    classes = sorted(set(train.labels))
    everything = real_images(per_class=VAL_PER_CLASS, classes=size["classes"] + VAL_CLASSES)
    val = [(u, c) for u, c in zip(everything.uris, everything.labels) if c not in classes]
    val_classes = sorted({c for _, c in val})
    p = params.retrieval
    return RetrievalJob(
        net=net_spec(params.model), optim=replace(optimisation(p), epochs=size["epochs"]),
        train=LabelledImages(train.uris, [classes.index(c) for c in train.labels]),
        retrieval_val=RetrievalValSet([u for u, _ in val], [val_classes.index(c) for _, c in val],
                                      [i < len(val_classes) for i in range(len(val))]),  # one query per class
        criterion=p.criterion.spec(),
        sampler=Spec("random_pairs", {"pos_per_class": size["pairs_per_class"], "neg_per_class": size["pairs_per_class"],
                                      "redraw_every": size["epochs"]}),
        eval_batch_size=params.index.batch_size)


def _pairs(job: RetrievalJob) -> np.ndarray:
    """The pairs train_retrieval draws for its first draw (the only one here: redraw_every = epochs)."""
    return draw_random_pairs(np.array(job.train.labels), job.sampler.args["pos_per_class"],
                             job.sampler.args["neg_per_class"], np.random.default_rng([job.optim.seed, 0]))


def _bare(job: RetrievalJob, threads: int, samples: int) -> dict[str, Any]:
    """The same training in plain PyTorch: pairs, transform, loss, SGD; no Ray, DDP, validation or checkpoints."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(job.optim.seed)
    net = job.net.build()
    o = job.optim
    loader = DataLoader(PairDataset(job.train.uris, _pairs(job)), batch_size=o.batch_size, shuffle=True,
                        collate_fn=PairBatchTransform(net.meta["mean"], net.meta["std"], o.train_max_side, o.hflip,
                                                      seed=o.seed, rotation_degrees=o.rotation_degrees,
                                                      color_jitter=o.color_jitter))
    loss_fn = LOSSES.build(job.criterion)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=o.lr, momentum=o.momentum,
                                weight_decay=o.weight_decay)
    net.train()
    freeze_batchnorm_statistics(net)
    with measured() as record:
        for _ in range(o.epochs):
            for images, y, _, _ in loader:
                loss = loss_fn(net(images), None, pair_tuple(y))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    torch.set_num_threads(previous)
    return {"path": "bare", "workers": 1, "threads": threads,
            "samples_per_s": round(samples * o.epochs / record["wall_seconds"], 3), **record}


def _firesight(job: RetrievalJob, cluster: Cluster, samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        times = Path(tmp) / "report_times.json"
        cluster = replace(cluster, storage_path=str(Path(tmp) / "ray"))
        with measured() as record:
            run_training(partial(timed_loop, loop=train_retrieval, times_file=str(times)), job, name="bench-train",
                         cluster=cluster, output_dir=Path(tmp) / "model")
        reported = json.loads(times.read_text())
    steady = reported[-1] - reported[0]  # epoch 1 to the last: training + per-epoch val and checkpoint
    return {"path": "firesight", "workers": cluster.num_workers, "threads": cluster.cpus_per_worker,
            "samples_per_s": round(samples * job.optim.epochs / steady, 3), "trained_seconds": round(steady, 3),
            "job_wall_seconds": record["wall_seconds"],
            "outside_training_seconds": round(record["wall_seconds"] - steady, 3), **record}


@dataclass
class _ReportClock:
    """A worker context that notes when each report returns."""

    inner: Any
    times: list[float]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def report(self, metrics: dict[str, float], write_checkpoint: Any) -> None:
        self.inner.report(metrics, write_checkpoint)
        self.times.append(time.perf_counter())


def timed_loop(job: Any, ctx: Any, *, loop: Any, times_file: str) -> None:
    """Run `loop(job, ctx)`; rank 0 writes the time each epoch's report returned (epoch 0 first) to `times_file`."""
    clock = _ReportClock(ctx, [])
    loop(job, clock)
    if ctx.rank == 0:
        Path(times_file).write_text(json.dumps(clock.times))
