"""Stage 1 on a worker: class-weighted cross-entropy on the train classes; selects by val accuracy."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from components.data.datasets import ImageDataset
from components.data.transforms import BatchTransform
from components.evaluation.validation import accuracy, val_map
from components.losses.classification import balanced_class_weights
from components.models.net import Classifier
from components.training.context import WorkerContext
from components.training.fit import augmenting, fit, initialise_pooling, make_optimizer, shuffled_shard, step
from components.training.jobs import ClassifyJob


def train_classifier(job: ClassifyJob, ctx: WorkerContext) -> None:
    torch.manual_seed(job.optim.seed)
    net = job.net.build()
    model = Classifier(net, len(job.classes)).to(ctx.device)
    initialise_pooling(net, job.train, job.eval_batch_size, job.optim.seed, ctx.device)  # NetVLAD: before its head trains
    criterion = nn.CrossEntropyLoss(weight=balanced_class_weights(np.array(job.train.labels), len(job.classes)).to(ctx.device))
    train_set = ImageDataset(job.train.uris, job.train.labels)
    collate = augmenting(BatchTransform, net, job.optim, ctx)

    def run_epoch(ddp: nn.Module, epoch: int) -> tuple[float, list[int]]:
        sampler = shuffled_shard(train_set, ctx, job.optim.seed, epoch)
        loader = DataLoader(train_set, batch_size=job.optim.batch_size, sampler=sampler, collate_fn=collate)
        losses = []
        for images, labels, _ in loader:
            loss = criterion(ddp(images.to(ctx.device)), labels.to(ctx.device))
            step(optimizer, loss)
            losses.append(loss.item())
            ctx.progress(epoch, len(losses), len(loader), float(np.mean(losses)))
        return float(np.mean(losses)), list(sampler)

    def evaluate(epoch: int) -> dict[str, float]:
        return {
            "val_accuracy": accuracy(model, job.val, net.meta, job.eval_batch_size, ctx),
            "val_map": val_map(net, job.retrieval_val, job.eval_batch_size, ctx),
        }

    optimizer = make_optimizer(model, job.optim)
    fit(model, net, optimizer, job.optim, ctx, "val_accuracy", run_epoch, evaluate, job.audit_dir,
        extra_meta={"stage": "classify", "classes": job.classes})
