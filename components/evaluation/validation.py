"""Validation inside a training job: every rank embeds a shard, the results are gathered on every rank."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from components.data.datasets import ImageDataset
from components.data.transforms import BatchTransform
from components.evaluation.protocol import leave_one_out_map
from components.models.net import Classifier, RetrievalNet
from components.search.embed import embed_images
from components.training.context import WorkerContext, gather_objects
from components.training.jobs import LabelledImages, RetrievalValSet


@torch.no_grad()
def accuracy(model: Classifier, images: LabelledImages, meta: dict, batch_size: int, ctx: WorkerContext) -> float:
    model.eval()
    dataset = ImageDataset(images.uris, images.labels)
    loader = DataLoader(Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world_size))), batch_size=batch_size,
                        collate_fn=BatchTransform.for_eval(meta))
    correct = total = 0
    for x, y, _ in loader:
        correct += int((model(x.to(ctx.device)).argmax(-1).cpu() == y).sum())
        total += len(y)
    counts = gather_objects((correct, total))
    return sum(c for c, _ in counts) / max(1, sum(t for _, t in counts))


def embed_all(net: RetrievalNet, uris: list[str], indices: np.ndarray, batch_size: int, ctx: WorkerContext) -> np.ndarray:
    """Descriptors of uris[indices] (in that order): each rank embeds a shard, every rank gets them all."""
    keys, desc = embed_images(net, uris, batch_size=batch_size, device=ctx.device,
                              indices=indices[ctx.rank::ctx.world_size].tolist())
    parts = gather_objects((keys, desc))
    where = {int(k): r for r, k in enumerate(indices)}
    out = np.empty((len(indices), net.meta["dim"]), dtype=np.float32)
    for keys, part in parts:
        out[[where[int(k)] for k in keys]] = part
    return out


def val_map(net: RetrievalNet, val: RetrievalValSet, batch_size: int, ctx: WorkerContext) -> float:
    """Leave-one-out mAP over the val classes' images (each queries all the others): the statistic every choice on
    val is made by (best epoch, tuned params, post-processing), many more queries than the Firearm protocol's."""
    descriptors = embed_all(net, val.uris, np.arange(len(val.uris)), batch_size, ctx)
    return leave_one_out_map(descriptors, np.array(val.labels))
