"""Per-worker training loops (plain PyTorch + torch.distributed; Ray Train only calls them).

Both loops evaluate before the first epoch (epoch 0), after every epoch, keep the best model by their selection
metric, and write a checkpoint each epoch that holds the train state (to resume), the best model so far, and the
metric history.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from components.data.datasets import ImageDataset, PairDataset
from components.data.samplers import (PKBatchSampler, draw_query_positives, draw_random_pairs, draw_ratio_pairs,
                                      mine_hard_negative_pairs)
from components.data.transforms import BatchTransform, PairBatchTransform
from components.evaluation.protocol import score_queries
from components.losses.classification import balanced_class_weights
from components.losses.contrastive import DoubleMarginContrastiveLoss
from components.losses.triplet import BatchHardTripletLoss
from components.losses.verification import NegativeRatioSchedule, SiameseIdVerLoss
from components.models.net import Classifier, RetrievalNet, freeze_batchnorm_statistics, load_net, save_checkpoint
from components.search.embed import embed_images
from components.training.context import BEST_MODEL_FILE, TRAIN_STATE_FILE, WorkerContext, gather_objects, write_history


@dataclass(frozen=True)
class Optimisation:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    lr_step_epochs: int
    lr_gamma: float
    train_max_side: tuple[int, int]
    hflip: bool
    seed: int
    head_lr_multiplier: float = 1.0
    rotation_degrees: float = 0.0
    color_jitter: float = 0.0


@dataclass(frozen=True)
class LabelledImages:
    uris: list[str]
    labels: list[int]


@dataclass(frozen=True)
class RetrievalValSet:
    """Images of held-out classes: queries are searched against the rest (the database)."""

    uris: list[str]
    labels: list[int]
    is_query: list[bool]


@dataclass(frozen=True)
class NetSpec:
    """How to build the starting network: from a checkpoint, or an architecture with its weights."""

    arch: str
    pooling: str
    gem_p: float
    image_size: int
    weights: str | None
    frozen_stages: int
    init_checkpoint: str | None = None

    def build(self) -> RetrievalNet:
        if self.init_checkpoint:
            net = load_net(Path(self.init_checkpoint))
            net.meta = {**net.meta, "image_size": self.image_size}
        else:
            net = RetrievalNet.create(self.arch, self.pooling, self.image_size, self.weights, self.gem_p)
        net.freeze(self.frozen_stages)
        return net


@dataclass(frozen=True)
class ClassifyJob:
    net: NetSpec
    optim: Optimisation
    classes: list[str]
    train: LabelledImages
    val: LabelledImages
    retrieval_val: RetrievalValSet
    eval_batch_size: int = 32
    audit_dir: str | None = None


@dataclass(frozen=True)
class RetrievalJob:
    net: NetSpec
    optim: Optimisation
    train: LabelledImages
    retrieval_val: RetrievalValSet
    pos_margin: float
    neg_margin: float
    pos_pairs_per_class: int
    neg_pairs_per_class: int
    redraw_every: int
    eval_batch_size: int = 32
    audit_dir: str | None = None
    loss: str = "contrastive"  # contrastive (m+ = 0: single margin) | triplet (P×K batch-hard) | siamese (id + verification)
    squared_hinge: bool = True
    mining: str = "random"  # pairs: random (DeepFirearm) | hard_negative (one per class from a pool, current model)
    mining_pool_size: int = 2000
    triplet_margin: float = 0.1
    classes_per_batch: int = 8
    images_per_class: int = 4
    measure_start: bool = True  # evaluate the starting model as epoch 0 (a margin-search trial skips it)

    def __post_init__(self) -> None:
        if self.loss not in RETRIEVAL_LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {RETRIEVAL_LOSSES}")
        if self.mining not in PAIR_MINING:
            raise ValueError(f"unknown mining {self.mining!r}; expected one of {PAIR_MINING}")


RETRIEVAL_LOSSES = ("contrastive", "triplet", "siamese")
PAIR_MINING = ("random", "hard_negative")


class _RetrievalModel(nn.Module):
    """The net plus the loss's own parameters (siamese heads), so one optimiser and one DDP wrapper see both."""

    def __init__(self, net: RetrievalNet, loss: nn.Module) -> None:
        super().__init__()
        self.net, self.loss = net, loss

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


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


def train_classifier(job: ClassifyJob, ctx: WorkerContext) -> None:
    """Stage 1: class-weighted cross-entropy on the train classes; selects by val accuracy."""
    torch.manual_seed(job.optim.seed)
    net = job.net.build()
    model = Classifier(net, len(job.classes)).to(ctx.device)
    criterion = nn.CrossEntropyLoss(weight=balanced_class_weights(np.array(job.train.labels), len(job.classes)).to(ctx.device))
    train_set = ImageDataset(job.train.uris, job.train.labels)
    collate = _augmenting(BatchTransform, net, job.optim, ctx)

    def run_epoch(ddp: nn.Module, epoch: int) -> tuple[float, list[int]]:
        sampler = _sampler(train_set, ctx, job.optim.seed, shuffle=True)
        sampler.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=job.optim.batch_size, sampler=sampler, collate_fn=collate)
        losses = []
        for images, labels, _ in loader:
            loss = criterion(ddp(images.to(ctx.device)), labels.to(ctx.device))
            _step(optimizer, loss)
            losses.append(loss.item())
            ctx.progress(epoch, len(losses), len(loader), float(np.mean(losses)))
        return float(np.mean(losses)), list(sampler)

    def evaluate(epoch: int) -> dict[str, float]:
        return {
            "val_accuracy": _accuracy(model, job.val, net.meta, job.eval_batch_size, ctx),
            "val_map": _val_map(net, job.retrieval_val, job.eval_batch_size, ctx),
        }

    optimizer = _optimizer(model, job.optim)
    _fit(model, net, optimizer, job.optim, ctx, "val_accuracy", run_epoch, evaluate, job.audit_dir,
         extra_meta={"stage": "classify", "classes": job.classes})


def train_retrieval(job: RetrievalJob, ctx: WorkerContext) -> None:
    """Stage 2: metric learning on the train classes, selecting by val mAP.

    contrastive/siamese train on pairs (random, or with hard negatives mined by the current model) redrawn every
    `redraw_every` epochs (siamese: every epoch, its negative share grows ×1.01 per epoch up to 1:4); triplet trains
    on P×K batches with in-batch hard mining.
    """
    torch.manual_seed(job.optim.seed)
    net = job.net.build()
    labels = np.array(job.train.labels)
    model = _RetrievalModel(net, _retrieval_loss(job, net.meta["dim"], int(labels.max()) + 1)).to(ctx.device)
    label_tensor = torch.as_tensor(labels, device=ctx.device)
    pairs_of_draw: dict[int, np.ndarray] = {}

    def pairs_for(epoch: int) -> np.ndarray:
        draw = epoch if job.loss == "siamese" else (epoch - 1) // job.redraw_every
        if draw not in pairs_of_draw:  # identical on every rank: seeded by the draw, mined on gathered descriptors
            rng = np.random.default_rng([job.optim.seed, draw])
            pairs_of_draw.clear()
            pairs_of_draw[draw] = (_ratio_pairs(labels, job.pos_pairs_per_class, epoch, rng) if job.loss == "siamese"
                                   else _mined_pairs(net, job, labels, rng, ctx) if job.mining == "hard_negative"
                                   else draw_random_pairs(labels, job.pos_pairs_per_class, job.neg_pairs_per_class, rng))
        return pairs_of_draw[draw]

    def run_pairs_epoch(ddp: nn.Module, epoch: int) -> tuple[float, list[int]]:
        pair_set = PairDataset(job.train.uris, pairs_for(epoch))
        sampler = _sampler(pair_set, ctx, job.optim.seed, shuffle=True)
        sampler.set_epoch(epoch)
        loader = DataLoader(pair_set, batch_size=job.optim.batch_size, sampler=sampler, collate_fn=_augmenting(PairBatchTransform, net, job.optim, ctx))
        losses = []
        for images, y, i, j in loader:
            a, b = ddp(images.to(ctx.device)).chunk(2)
            y = y.to(ctx.device)
            loss = model.loss(a, b, y, label_tensor[i], label_tensor[j]) if job.loss == "siamese" else model.loss(a, b, y)
            _step(optimizer, loss)
            losses.append(loss.item())
            ctx.progress(epoch, len(losses), len(loader), float(np.mean(losses)))
        return float(np.mean(losses)), list(sampler)

    def run_triplet_epoch(ddp: nn.Module, epoch: int) -> tuple[float, list[int]]:
        sampler = PKBatchSampler(labels, job.classes_per_batch, job.images_per_class, seed=job.optim.seed,
                                 num_replicas=ctx.world_size, rank=ctx.rank)
        sampler.set_epoch(epoch)
        loader = DataLoader(ImageDataset(job.train.uris, job.train.labels), batch_sampler=sampler,
                            collate_fn=_augmenting(BatchTransform, net, job.optim, ctx))
        losses, seen = [], []
        for images, batch_labels, idx in loader:
            loss = model.loss(ddp(images.to(ctx.device)), batch_labels.to(ctx.device))
            _step(optimizer, loss)
            losses.append(loss.item())
            ctx.progress(epoch, len(losses), len(loader), float(np.mean(losses)))
            seen.extend(idx.tolist())
        return float(np.mean(losses)), seen

    def evaluate(epoch: int) -> dict[str, float]:
        return {"val_map": _val_map(net, job.retrieval_val, job.eval_batch_size, ctx)}

    optimizer = _optimizer(model, job.optim)
    _fit(model, net, optimizer, job.optim, ctx, "val_map", run_triplet_epoch if job.loss == "triplet" else run_pairs_epoch,
         evaluate, job.audit_dir, extra_meta={"stage": "retrieval", "loss": job.loss, "mining": job.mining,
                                              "pos_margin": job.pos_margin, "neg_margin": job.neg_margin},
         first_epoch=0 if job.measure_start else 1)


def _retrieval_loss(job: RetrievalJob, dim: int, num_classes: int) -> nn.Module:
    if job.loss == "triplet":
        return BatchHardTripletLoss(job.triplet_margin)
    if job.loss == "siamese":
        return SiameseIdVerLoss(dim, num_classes)
    return DoubleMarginContrastiveLoss(job.pos_margin, job.neg_margin, squared=job.squared_hinge)


def _ratio_pairs(labels: np.ndarray, pos_per_class: int, epoch: int, rng: np.random.Generator) -> np.ndarray:
    return draw_ratio_pairs(labels, pos_per_class, NegativeRatioSchedule().ratio(epoch), rng)


def _mined_pairs(net: RetrievalNet, job: RetrievalJob, labels: np.ndarray, rng: np.random.Generator, ctx: WorkerContext) -> np.ndarray:
    """cnnimageretrieval-style draw: random queries, each with a random positive and the hardest negatives (one per
    class) among a random pool, ranked by the current model's descriptors."""
    n, classes = len(labels), len(np.unique(labels))
    queries = np.sort(rng.choice(n, size=min(n, classes * job.pos_pairs_per_class), replace=False))
    pool = np.sort(rng.choice(n, size=min(n, job.mining_pool_size), replace=False))
    needed = np.union1d(queries, pool)
    desc = _embed_all(net, job.train.uris, needed, job.eval_batch_size, ctx)
    row = {int(k): r for r, k in enumerate(needed)}
    q_desc, p_desc = desc[[row[int(k)] for k in queries]], desc[[row[int(k)] for k in pool]]
    negatives = mine_hard_negative_pairs(q_desc, labels[queries], p_desc, labels[pool], queries, pool,
                                         negatives_per_query=max(1, round(job.neg_pairs_per_class / job.pos_pairs_per_class)))
    return np.concatenate([draw_query_positives(queries, labels, rng), negatives])


def _augmenting(transform: type[BatchTransform], net: RetrievalNet, optim: Optimisation, ctx: WorkerContext) -> BatchTransform:
    return transform(net.meta["mean"], net.meta["std"], optim.train_max_side, optim.hflip, seed=optim.seed + ctx.rank,
                     rotation_degrees=optim.rotation_degrees, color_jitter=optim.color_jitter)


def _fit(model, net, optimizer, optim: Optimisation, ctx: WorkerContext, metric: str, run_epoch, evaluate, audit_dir,
         extra_meta, first_epoch: int = 0) -> None:
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


def _sampler(dataset, ctx: WorkerContext, seed: int, shuffle: bool) -> DistributedSampler:
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed)


def _optimizer(model: nn.Module, optim: Optimisation) -> torch.optim.Optimizer:
    """SGD over the trainable parameters; a new classification head learns `head_lr_multiplier` × faster."""
    head = list(model.head.parameters()) if isinstance(model, Classifier) else []
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": body}] + ([{"params": head, "lr": optim.lr * optim.head_lr_multiplier}] if head else [])
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _shard(n: int, ctx: WorkerContext) -> list[int]:
    return list(range(ctx.rank, n, ctx.world_size))


@torch.no_grad()
def _accuracy(model: Classifier, images: LabelledImages, meta: dict, batch_size: int, ctx: WorkerContext) -> float:
    model.eval()
    dataset = ImageDataset(images.uris, images.labels)
    loader = DataLoader(torch.utils.data.Subset(dataset, _shard(len(dataset), ctx)), batch_size=batch_size,
                        collate_fn=BatchTransform.for_eval(meta))
    correct = total = 0
    for x, y, _ in loader:
        correct += int((model(x.to(ctx.device)).argmax(-1).cpu() == y).sum())
        total += len(y)
    counts = gather_objects((correct, total))
    return sum(c for c, _ in counts) / max(1, sum(t for _, t in counts))


def _embed_all(net: RetrievalNet, uris: list[str], indices: np.ndarray, batch_size: int, ctx: WorkerContext) -> np.ndarray:
    """Descriptors of uris[indices] (in that order): each rank embeds a shard, every rank gets them all."""
    keys, desc = embed_images(net, uris, batch_size=batch_size, device=ctx.device,
                              indices=indices[ctx.rank::ctx.world_size].tolist())
    parts = gather_objects((keys, desc))
    where = {int(k): r for r, k in enumerate(indices)}
    out = np.empty((len(indices), net.meta["dim"]), dtype=np.float32)
    for keys, part in parts:
        out[[where[int(k)] for k in keys]] = part
    return out


def _val_map(net: RetrievalNet, val: RetrievalValSet, batch_size: int, ctx: WorkerContext) -> float:
    descriptors = _embed_all(net, val.uris, np.arange(len(val.uris)), batch_size, ctx)
    is_query = np.array(val.is_query)
    labels = np.array(val.labels)
    metrics, _ = score_queries(descriptors[is_query], labels[is_query], descriptors[~is_query], labels[~is_query])
    return metrics["map"]


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
