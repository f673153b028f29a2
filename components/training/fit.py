"""The epoch loop both training jobs share: evaluate before the first epoch (epoch 0) and after every epoch, keep
the best model by the selection metric, and write a checkpoint each epoch that holds the train state (to resume),
the best model so far, and the metric history."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from components.data.datasets import ImageDataset
from components.data.transforms import BatchTransform
from components.models.net import Classifier, RetrievalNet, freeze_batchnorm_statistics, save_checkpoint
from components.training.context import BEST_MODEL_FILE, TRAIN_STATE_FILE, WorkerContext, write_history
from components.training.jobs import LabelledImages, Optimisation

# One training epoch on the (DDP-wrapped) model: (mean loss, the sample positions this rank trained on).
EpochRunner = Callable[[nn.Module, int], tuple[float, list[int]]]


@dataclass
class _Tracker:
    """Metric history and the best model so far (rank 0 writes both into every checkpoint)."""

    metric: str
    history: list[dict[str, float]] = field(default_factory=list)
    best_value: float = float("-inf")
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None

    def update(self, metrics: dict[str, float], net: RetrievalNet) -> None:
        self.history.append(metrics)
        if metrics[self.metric] > self.best_value:
            self.best_value, self.best_epoch = metrics[self.metric], int(metrics["epoch"])
            self.best_state = copy.deepcopy(net.state_dict())

    def state(self) -> dict[str, Any]:
        return {"history": self.history, "best_value": self.best_value, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load(self, state: dict[str, Any]) -> None:
        self.history, self.best_value = state["history"], state["best_value"]
        self.best_epoch, self.best_state = state["best_epoch"], state["best_state"]


def fit(model: nn.Module, net: RetrievalNet, optimizer: torch.optim.Optimizer, optim: Optimisation, ctx: WorkerContext,
        metric: str, run_epoch: EpochRunner, evaluate: Callable[[int], dict[str, float]], audit_dir: str | None,
        extra_meta: dict[str, Any], first_epoch: int = 0) -> None:
    """Train `model` (whose `net` is what gets checkpointed) for `optim.epochs` epochs, resuming from the latest
    checkpoint when Ray restarted the job."""
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim.lr_step_epochs, gamma=optim.lr_gamma)
    tracker = _Tracker(metric)
    start = first_epoch
    restored = ctx.restored_state()
    if restored is not None:
        model.load_state_dict(restored["model"])
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        tracker.load(restored["tracker"])
        start = restored["epoch"] + 1
        if start > optim.epochs:  # restored after its last epoch, whose report may never have reached the driver
            ctx.report(tracker.history[-1], None)
    ddp = DistributedDataParallel(model) if ctx.world_size > 1 else model
    seen_by_epoch: dict[int, list[int]] = {}
    for epoch in range(start, optim.epochs + 1):
        metrics: dict[str, float] = {"epoch": epoch, "lr": scheduler.get_last_lr()[0]}
        if epoch > 0:  # epoch 0 measures the starting point before any update
            model.train()
            freeze_batchnorm_statistics(model)
            metrics["train_loss"], seen_by_epoch[epoch] = run_epoch(ddp, epoch)
            scheduler.step()
        metrics.update(evaluate(epoch))
        tracker.update(metrics, net)
        writer = None
        if ctx.rank == 0:
            state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "tracker": tracker.state()}
            meta = {**extra_meta, "best_epoch": tracker.best_epoch, metric: tracker.best_value}

            def writer(folder: Path, state=state, meta=meta) -> None:
                torch.save(state, folder / TRAIN_STATE_FILE)
                best = copy.deepcopy(net)
                best.load_state_dict(tracker.best_state)
                save_checkpoint(folder / BEST_MODEL_FILE, best, meta)
                write_history(folder, tracker.history)
        ctx.report(metrics, writer)
    if audit_dir:
        _write_audit(Path(audit_dir), ctx.rank, seen_by_epoch, model)


def shuffled_shard(dataset: Dataset, ctx: WorkerContext, seed: int, epoch: int) -> DistributedSampler:
    """This rank's shard of `dataset` for `epoch`, shuffled identically on every rank."""
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return sampler


def augmenting(transform: type[BatchTransform], net: RetrievalNet, optim: Optimisation, ctx: WorkerContext) -> BatchTransform:
    """The training collate: random resize within `train_max_side`, flips and the optional augmentations."""
    return transform(net.meta["mean"], net.meta["std"], optim.train_max_side, optim.hflip, seed=optim.seed + ctx.rank,
                     rotation_degrees=optim.rotation_degrees, color_jitter=optim.color_jitter)


def make_optimizer(model: nn.Module, optim: Optimisation) -> torch.optim.Optimizer:
    """SGD over the trainable parameters; a new classification head learns `head_lr_multiplier` × faster."""
    head = list(model.head.parameters()) if isinstance(model, Classifier) else []
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": body}] + ([{"params": head, "lr": optim.lr * optim.head_lr_multiplier}] if head else [])
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _write_audit(folder: Path, rank: int, seen_by_epoch: dict[int, list[int]], model: nn.Module) -> None:
    """Per-rank record of the sample positions (its data shard) it trained on each epoch and a digest of its
    final weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "weights_sha256": digest.hexdigest(),
                                                         "seen": {str(k): v for k, v in seen_by_epoch.items()}}))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


POOLING_INIT_IMAGES = 64  # train images whose feature maps initialise a pooling's layers (NetVLAD's k-means)


@torch.no_grad()
def initialise_pooling(net: RetrievalNet, train: LabelledImages, batch_size: int, seed: int,
                       device: torch.device | str = "cpu", n_images: int = POOLING_INIT_IMAGES) -> bool:
    """Initialise a pooling whose layers start from data (NetVLAD: PCA reduction and k-means centres), unless it is
    already (`is_initialised`, kept in its state dict: a net from an initialised checkpoint keeps its pooling), from
    the backbone's feature maps of a seeded sample of `n_images` train images, preprocessed as for evaluation.
    Every rank draws the same sample and gets the same centres. Returns whether it initialised anything."""
    pool = net.pool
    if not hasattr(pool, "init_from_features") or pool.is_initialised:
        return False
    rng = np.random.default_rng([seed, len(train.uris)])
    picks = np.sort(rng.choice(len(train.uris), size=min(n_images, len(train.uris)), replace=False)).tolist()
    loader = DataLoader(Subset(ImageDataset(train.uris, train.labels), picks), batch_size=batch_size,
                        collate_fn=BatchTransform.for_eval(net.meta))
    training = net.training
    net.eval()
    maps = [net.backbone.forward_features(x.to(device)) for x, _, _ in loader]
    local = torch.cat([m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]) for m in maps])  # (N, C) local features
    pool.init_from_features(local, seed=seed)
    net.train(training)
    return True
