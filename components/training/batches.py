"""Samplers: how a retrieval job's epochs are cut into batches, selected by name from `SAMPLERS`.

Every sampler yields `Batch`es — images, one label per image and the index tuple of the pairs the loss should use
(None: the loss or a miner takes what it needs from the whole batch). Pair samplers (DeepFirearm's random pairs,
hard negatives mined by the current model, a growing share of negatives) draw N+ positive and N− negative pairs per
class, identically on every rank (seeded by the draw; mined on gathered descriptors), and shard them over the ranks;
`class_balanced` draws P×K batches for in-batch mining.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from components.data.datasets import ImageDataset, PairDataset
from components.data.samplers import (PKBatchSampler, draw_query_positives, draw_random_pairs, draw_ratio_pairs,
                                      mine_hard_negative_pairs)
from components.data.transforms import BatchTransform, PairBatchTransform
from components.evaluation.validation import embed_all
from components.losses.pairs import IndicesTuple, pair_tuple
from components.losses.verification import NegativeRatioSchedule
from components.models.net import RetrievalNet
from components.registry import Registry
from components.training.context import WorkerContext
from components.training.fit import augmenting, shuffled_shard
from components.training.jobs import LabelledImages, Optimisation


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    indices_tuple: IndicesTuple | None


@dataclass(frozen=True)
class TrainingData:
    """What a sampler draws from: the train images and the state it may need (the current net, for mining)."""

    train: LabelledImages
    net: RetrievalNet
    optim: Optimisation
    ctx: WorkerContext
    eval_batch_size: int


class EpochBatches:
    """One epoch's batches on this rank: iterable, with a length; `positions` are the sample positions (of the
    epoch's pairs, or images) this rank trained on."""

    def __init__(self, loader: DataLoader, to_batch: Callable[[tuple], Batch], positions: list[int]) -> None:
        self.loader, self.to_batch, self.positions = loader, to_batch, positions

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        return (self.to_batch(item) for item in self.loader)


class _PairSampler(ABC):
    """Batches of `optim.batch_size` pairs (2 × that many images), the pairs redrawn every `redraw_every` epochs."""

    def __init__(self, pos_per_class: int, neg_per_class: int, redraw_every: int) -> None:
        self.pos_per_class, self.neg_per_class, self.redraw_every = pos_per_class, neg_per_class, redraw_every
        self._drawn: dict[int, np.ndarray] = {}

    def draw_number(self, epoch: int) -> int:
        return (epoch - 1) // self.redraw_every

    @abstractmethod
    def draw(self, epoch: int, labels: np.ndarray, rng: np.random.Generator, data: TrainingData) -> np.ndarray:
        """The (n, 3) pairs (i, j, same) of one draw."""

    def batches(self, epoch: int, data: TrainingData) -> EpochBatches:
        labels = np.array(data.train.labels)
        number = self.draw_number(epoch)
        if number not in self._drawn:
            self._drawn = {number: self.draw(epoch, labels, np.random.default_rng([data.optim.seed, number]), data)}
        pair_set = PairDataset(data.train.uris, self._drawn[number])
        sampler = shuffled_shard(pair_set, data.ctx, data.optim.seed, epoch)
        loader = DataLoader(pair_set, batch_size=data.optim.batch_size, sampler=sampler,
                            collate_fn=augmenting(PairBatchTransform, data.net, data.optim, data.ctx))
        label_of = torch.as_tensor(labels)

        def to_batch(item) -> Batch:
            images, same, i, j = item
            return Batch(images, label_of[torch.cat([i, j])], pair_tuple(same))

        return EpochBatches(loader, to_batch, list(sampler))


class RandomPairs(_PairSampler):
    """DeepFirearm: N+ random positive and N− random negative pairs per class."""

    def draw(self, epoch, labels, rng, data) -> np.ndarray:
        return draw_random_pairs(labels, self.pos_per_class, self.neg_per_class, rng)


class HardNegativePairs(_PairSampler):
    """cnnimageretrieval-style: random queries, each with a random positive and its hardest negatives (one per
    class) among a random pool of `pool_size` images, ranked by the current model's descriptors."""

    def __init__(self, pos_per_class: int, neg_per_class: int, redraw_every: int, pool_size: int) -> None:
        super().__init__(pos_per_class, neg_per_class, redraw_every)
        self.pool_size = pool_size

    def draw(self, epoch, labels, rng, data) -> np.ndarray:
        n, classes = len(labels), len(np.unique(labels))
        queries = np.sort(rng.choice(n, size=min(n, classes * self.pos_per_class), replace=False))
        pool = np.sort(rng.choice(n, size=min(n, self.pool_size), replace=False))
        needed = np.union1d(queries, pool)
        desc = embed_all(data.net, data.train.uris, needed, data.eval_batch_size, data.ctx)
        row = {int(k): r for r, k in enumerate(needed)}
        q_desc, p_desc = desc[[row[int(k)] for k in queries]], desc[[row[int(k)] for k in pool]]
        negatives = mine_hard_negative_pairs(q_desc, labels[queries], p_desc, labels[pool], queries, pool,
                                             negatives_per_query=max(1, round(self.neg_per_class / self.pos_per_class)))
        return np.concatenate([draw_query_positives(queries, labels, rng), negatives])


class RatioPairs(_PairSampler):
    """Zheng et al.: N+ positive pairs per class and a share of negatives that grows every epoch
    (`NegativeRatioSchedule`); redrawn every epoch."""

    def __init__(self, pos_per_class: int, start: float = 1.0, growth: float = 1.01, max_ratio: float = 4.0) -> None:
        super().__init__(pos_per_class, neg_per_class=0, redraw_every=1)
        self.schedule = NegativeRatioSchedule(start, growth, max_ratio)

    def draw_number(self, epoch: int) -> int:
        return epoch

    def draw(self, epoch, labels, rng, data) -> np.ndarray:
        return draw_ratio_pairs(labels, self.pos_per_class, self.schedule.ratio(epoch), rng)


class ClassBalanced:
    """P×K batches (`classes_per_batch` × `images_per_class`), every class about once an epoch; the loss (or a
    miner) picks its pairs or triplets inside each batch."""

    def __init__(self, classes_per_batch: int, images_per_class: int) -> None:
        self.classes_per_batch, self.images_per_class = classes_per_batch, images_per_class

    def batches(self, epoch: int, data: TrainingData) -> EpochBatches:
        sampler = PKBatchSampler(np.array(data.train.labels), self.classes_per_batch, self.images_per_class,
                                 seed=data.optim.seed, num_replicas=data.ctx.world_size, rank=data.ctx.rank)
        sampler.set_epoch(epoch)
        loader = DataLoader(ImageDataset(data.train.uris, data.train.labels), batch_sampler=sampler,
                            collate_fn=augmenting(BatchTransform, data.net, data.optim, data.ctx))

        positions: list[int] = []

        def to_batch(item) -> Batch:
            images, labels, index = item
            positions.extend(index.tolist())
            return Batch(images, labels, None)

        return EpochBatches(loader, to_batch, positions)


SAMPLERS = Registry("sampler", {
    "random_pairs": RandomPairs,
    "hard_negative_pairs": HardNegativePairs,
    "ratio_pairs": RatioPairs,
    "class_balanced": ClassBalanced,
})
