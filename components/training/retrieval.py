"""Stage 2 on a worker: metric learning on the train classes, selecting by val mAP — one loop for every loss,
sampler and miner: embed the batch, let the miner (if any) choose its pairs or triplets, call the loss. With
`cache_frozen_trunk`, the frozen trunk's outputs are computed once (`feature_cache`) and every step and every val
pass runs only the trainable blocks."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from components.evaluation.protocol import leave_one_out_map
from components.evaluation.validation import val_map
from components.losses import LOSSES
from components.miners import MINERS
from components.models.net import RetrievalNet
from components.training.batches import SAMPLERS, TrainingData
from components.training.context import WorkerContext
from components.training.feature_cache import ValTrunks, train_cache
from components.training.fit import fit, initialise_pooling, make_optimizer, step
from components.training.jobs import RetrievalJob


class _RetrievalModel(nn.Module):
    """The net plus the loss's own parameters (heads, proxies), so one optimiser and one DDP wrapper see both."""

    def __init__(self, net: RetrievalNet, loss: nn.Module, trunk_blocks: int | None = None) -> None:
        super().__init__()
        self.net, self.loss, self.trunk_blocks = net, loss, trunk_blocks

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Descriptors of a batch of images, or of their cached trunks when the job caches them."""
        if self.trunk_blocks is None:
            return self.net(inputs)
        return self.net.describe_from_trunk(inputs, self.trunk_blocks)


def train_retrieval(job: RetrievalJob, ctx: WorkerContext) -> None:
    torch.manual_seed(job.optim.seed)
    net = job.net.build()
    num_classes = int(np.max(job.train.labels)) + 1
    criterion = LOSSES.build(job.criterion, num_classes=num_classes, embedding_size=net.meta["dim"])
    trunk_blocks = net.frozen_trunk() if job.cache_frozen_trunk else None
    model = _RetrievalModel(net, criterion, trunk_blocks).to(ctx.device)
    initialise_pooling(net, job.train, job.eval_batch_size, job.optim.seed, ctx.device)
    miner = MINERS.build(job.miner) if job.miner else None
    sampler = SAMPLERS.build(job.sampler)
    cache = val_trunks = None
    if trunk_blocks is not None:
        side, high = job.optim.train_max_side
        if side != high or job.optim.rotation_degrees or job.optim.color_jitter:
            raise ValueError("a cached trunk trains at one size with flips only: train_max_side [S, S], no rotation "
                             "or colour jitter")
        cache = train_cache(net, trunk_blocks, job.train.uris, side, job.optim.hflip, job.eval_batch_size, ctx,
                            job.optim.seed)
        val_trunks = ValTrunks(net, trunk_blocks, job.retrieval_val.uris, job.eval_batch_size, ctx)
    data = TrainingData(job.train, net, job.optim, ctx, job.eval_batch_size, cache)

    epoch_stats: dict[str, float] = {}  # what the sampler reports of its last draw (mined positives), logged per epoch

    def run_epoch(ddp: nn.Module, epoch: int) -> tuple[float, list[int]]:
        batches = sampler.batches(epoch, data)
        epoch_stats.update(batches.stats)
        losses = []
        for batch in batches:
            embeddings = ddp(batch.images.to(ctx.device))
            labels = batch.labels.to(ctx.device)
            indices_tuple = (miner(embeddings, labels) if miner else None if batch.indices_tuple is None
                             else tuple(t.to(ctx.device) for t in batch.indices_tuple))
            loss = model.loss(embeddings, labels, indices_tuple)
            step(optimizer, loss)
            losses.append(loss.item())
            ctx.progress(epoch, len(losses), len(batches), float(np.mean(losses)))
        return float(np.mean(losses)), batches.positions

    def evaluate(epoch: int) -> dict[str, float]:
        if val_trunks is None:
            value = val_map(net, job.retrieval_val, job.eval_batch_size, ctx)
        else:
            value = leave_one_out_map(val_trunks.describe(net), np.array(job.retrieval_val.labels))
        return {"val_map": value, **epoch_stats}

    optimizer = make_optimizer(model, job.optim)
    fit(model, net, optimizer, job.optim, ctx, "val_map", run_epoch, evaluate, job.audit_dir,
        extra_meta={"stage": "retrieval", "criterion": _described(job.criterion), "sampler": _described(job.sampler),
                    "miner": _described(job.miner) if job.miner else None},
        first_epoch=0 if job.measure_start else 1)


def _described(spec) -> dict:
    return {"name": spec.name, "args": dict(spec.args)}
