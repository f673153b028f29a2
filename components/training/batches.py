"""Samplers: how a retrieval job's epochs are cut into batches, selected by name from `SAMPLERS`.

Every sampler yields `Batch`es — images, one label per image and the index tuple of the pairs the loss should use
(None: the loss or a miner takes what it needs from the whole batch). Pair samplers (DeepFirearm's random pairs,
hard negatives mined by the current model, a growing share of negatives, random pairs plus positives mined by
clustering the current model's descriptors) draw N+ positive and N− negative pairs per class, identically on every
rank (seeded by the draw; mined on gathered descriptors), and shard them over the ranks; `class_balanced` draws P×K
batches for in-batch mining.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

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
from components.training.feature_cache import CachedImages, CachedPairs, TrunkCache, stack_images, stack_pairs
from components.training.fit import augmenting, shuffled_shard
from components.training.jobs import LabelledImages, Optimisation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    indices_tuple: IndicesTuple | None


@dataclass(frozen=True)
class TrainingData:
    """What a sampler draws from: the train images and the state it may need (the current net, for mining); with a
    `cache`, batches hold the images' cached trunks (`feature_cache`) instead of augmented images."""

    train: LabelledImages
    net: RetrievalNet
    optim: Optimisation
    ctx: WorkerContext
    eval_batch_size: int
    cache: TrunkCache | None = None

    def images(self) -> tuple[Dataset, Callable]:
        """The train images (items (image or trunk, label, i)) and their training collate."""
        if self.cache is not None:
            return CachedImages(self.cache, self.train.labels), stack_images
        return (ImageDataset(self.train.uris, self.train.labels),
                augmenting(BatchTransform, self.net, self.optim, self.ctx))

    def pairs(self, pairs: np.ndarray) -> tuple[Dataset, Callable]:
        """The pairs (i, j, same) of train images (items (a, b, same, i, j)) and their training collate."""
        if self.cache is not None:
            return CachedPairs(self.cache, pairs), stack_pairs
        return PairDataset(self.train.uris, pairs), augmenting(PairBatchTransform, self.net, self.optim, self.ctx)


class EpochBatches:
    """One epoch's batches on this rank: iterable, with a length; `positions` are the sample positions (of the
    epoch's pairs, or images) this rank trained on; `stats`: what the sampler reports of the epoch (e.g. how many
    positive pairs it mined)."""

    def __init__(self, loader: DataLoader, to_batch: Callable[[tuple], Batch], positions: list[int],
                 stats: dict[str, float] | None = None) -> None:
        self.loader, self.to_batch, self.positions = loader, to_batch, positions
        self.stats = dict(stats or {})

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
        pair_set, collate = data.pairs(self._drawn[number])
        sampler = shuffled_shard(pair_set, data.ctx, data.optim.seed, epoch)
        loader = DataLoader(pair_set, batch_size=data.optim.batch_size, sampler=sampler, collate_fn=collate)
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


def mine_cluster_positives(descriptors: np.ndarray, labels: np.ndarray, clusters: int, threshold: float,
                           max_per_class: int, seed: int, rng: np.random.Generator) -> np.ndarray:
    """Same-item mining (ALISC-style) on labelled images: cluster the descriptors (faiss spherical k-means, k =
    min(`clusters`, n), seeded by `seed`) and keep, as confident positives, the pairs of two images that share both
    their label and their cluster and whose cosine similarity is at least `threshold`; at most `max_per_class` of
    them per class (a random subset, by `rng`, when more qualify).

    Rows of `descriptors` are positions in `labels`. Returns an (n, 3) int array of (i, j, 1) with i < j, classes in
    order; pairs of different labels never appear.
    """
    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    labels = np.asarray(labels)
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} descriptors for {len(labels)} labels")
    if len(x) < 2:
        return np.empty((0, 3), dtype=np.int64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # cosine = dot product
    kmeans = faiss.Kmeans(x.shape[1], min(clusters, len(x)), niter=20, seed=seed, spherical=True,
                          min_points_per_centroid=1, verbose=False)
    kmeans.train(x)
    cluster = kmeans.index.search(x, 1)[1][:, 0]
    pairs = []
    for c in np.unique(labels):
        found = []
        own = np.flatnonzero(labels == c)
        for k in np.unique(cluster[own]):
            group = own[cluster[own] == k]
            if len(group) < 2:
                continue
            first, second = np.triu_indices(len(group), k=1)
            confident = (x[group[first]] * x[group[second]]).sum(axis=1) >= threshold
            found.append(np.stack([group[first[confident]], group[second[confident]]], axis=1))
        found = np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
        if len(found) > max_per_class:
            found = found[np.sort(rng.choice(len(found), size=max_per_class, replace=False))]
        pairs.append(np.concatenate([found, np.ones((len(found), 1), dtype=found.dtype)], axis=1))
    return np.concatenate(pairs).astype(np.int64)


class MinedPositivePairs(_PairSampler):
    """DeepFirearm's random pairs plus mined positives (ALISC's same-item mining, read for labelled data): at each
    draw every train image is embedded with the current model and `mine_cluster_positives` adds the confident
    same-class pairs of a k-means cluster (`clusters`, cosine ≥ `threshold`, at most `max_mined_per_class` per
    class). Only the job's train images are ever embedded, clustered or paired. Each epoch logs, and reports in its
    batches' `stats`, how many positive pairs it mined."""

    def __init__(self, pos_per_class: int, neg_per_class: int, redraw_every: int, clusters: int, threshold: float,
                 max_mined_per_class: int) -> None:
        super().__init__(pos_per_class, neg_per_class, redraw_every)
        if not -1 <= threshold <= 1:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        if clusters < 1 or max_mined_per_class < 1:
            raise ValueError(f"need clusters >= 1 and max_mined_per_class >= 1, got {clusters}, {max_mined_per_class}")
        self.clusters, self.threshold, self.max_mined_per_class = clusters, threshold, max_mined_per_class
        self.mined: dict[int, np.ndarray] = {}  # the current draw's mined pairs, by draw number

    def draw(self, epoch, labels, rng, data) -> np.ndarray:
        random = draw_random_pairs(labels, self.pos_per_class, self.neg_per_class, rng)
        desc = embed_all(data.net, data.train.uris, np.arange(len(labels)), data.eval_batch_size, data.ctx)
        mined = mine_cluster_positives(desc, labels, self.clusters, self.threshold, self.max_mined_per_class,
                                       seed=int(rng.integers(2**31 - 1)), rng=rng)
        self.mined = {self.draw_number(epoch): mined}
        return np.concatenate([random, mined])

    def batches(self, epoch: int, data: TrainingData) -> EpochBatches:
        batches = super().batches(epoch, data)
        mined = len(self.mined[self.draw_number(epoch)])
        batches.stats["mined_positive_pairs"] = mined
        log.info("epoch %d: %d mined positive pairs (cosine >= %g, %d clusters) on top of the random pairs",
                 epoch, mined, self.threshold, self.clusters)
        return batches


class ClassBalanced:
    """P×K batches (`classes_per_batch` × `images_per_class`), every class about once an epoch — or, with
    `batches_per_epoch`, that many batches (all ranks together), every class about equally often; the loss (or a
    miner) picks its pairs or triplets inside each batch."""

    def __init__(self, classes_per_batch: int, images_per_class: int, batches_per_epoch: int | None = None) -> None:
        self.classes_per_batch, self.images_per_class = classes_per_batch, images_per_class
        self.batches_per_epoch = batches_per_epoch

    def batches(self, epoch: int, data: TrainingData) -> EpochBatches:
        sampler = PKBatchSampler(np.array(data.train.labels), self.classes_per_batch, self.images_per_class,
                                 seed=data.optim.seed, num_replicas=data.ctx.world_size, rank=data.ctx.rank,
                                 batches=self.batches_per_epoch)
        sampler.set_epoch(epoch)
        dataset, collate = data.images()
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)

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
    "mined_positive_pairs": MinedPositivePairs,
    "class_balanced": ClassBalanced,
})
