"""Sampling for metric learning: random pairs (DeepFirearm: N+ positive and N− negative pairs per class), pairs at a
growing negative ratio, hard negatives mined with the current model, and P×K batches for in-batch mining."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def draw_random_pairs(labels: np.ndarray, pos_per_class: int, neg_per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Return an (n, 3) int array of (i, j, y): for every class, `pos_per_class` pairs of two different images
    of it (y=1) and `neg_per_class` pairs of one of its images with an image of another class (y=0).

    Classes with a single image get no positive pairs. Indices refer to positions in `labels`.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes to draw negative pairs, got {len(classes)}")
    members = {c: np.flatnonzero(labels == c) for c in classes}
    pairs = []
    for c in classes:
        own = members[c]
        others = np.flatnonzero(labels != c)
        if len(own) >= 2:
            a = rng.choice(own, size=pos_per_class)
            # shift by a random non-zero offset within the class so that j != i
            pos_in_class = np.searchsorted(own, a)
            b = own[(pos_in_class + rng.integers(1, len(own), size=pos_per_class)) % len(own)]
            pairs.append(np.stack([a, b, np.ones_like(a)], axis=1))
        a = rng.choice(own, size=neg_per_class)
        b = rng.choice(others, size=neg_per_class)
        pairs.append(np.stack([a, b, np.zeros_like(a)], axis=1))
    return np.concatenate(pairs).astype(np.int64)


def draw_ratio_pairs(labels: np.ndarray, pos_per_class: int, neg_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """`draw_random_pairs` with ⌊pos_per_class · neg_ratio + ½⌋ negative pairs per class (e.g. from a
    `NegativeRatioSchedule`)."""
    return draw_random_pairs(labels, pos_per_class, math.floor(pos_per_class * neg_ratio + 0.5), rng)


def draw_query_positives(query_index: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return an (n, 3) int array of (i, j, 1): each query i (a position in `labels`) with one random other image
    j of its class. Queries alone in their class get no pair."""
    labels = np.asarray(labels)
    query_index = np.asarray(query_index)
    pairs = []
    for c in np.unique(labels[query_index]):
        own = np.flatnonzero(labels == c)
        if len(own) < 2:
            continue
        a = query_index[labels[query_index] == c]
        # shift by a random non-zero offset within the class so that j != i
        b = own[(np.searchsorted(own, a) + rng.integers(1, len(own), size=len(a))) % len(own)]
        pairs.append(np.stack([a, b, np.ones_like(a)], axis=1))
    return np.concatenate(pairs).astype(np.int64) if pairs else np.empty((0, 3), dtype=np.int64)


def mine_hard_negative_pairs(query_desc: np.ndarray, query_labels: np.ndarray, pool_desc: np.ndarray,
                             pool_labels: np.ndarray, query_index: np.ndarray, pool_index: np.ndarray,
                             negatives_per_query: int = 1, chunk: int = 1024) -> np.ndarray:
    """Hard negatives as in cnnimageretrieval-pytorch: for each query, walk the pool by increasing Euclidean
    distance ‖q − x‖₂ and keep the first `negatives_per_query` images whose class differs from the query's and from
    the classes already kept for that query (one negative per class).

    Descriptors come from the current model; `query_index` / `pool_index` map rows to positions in the training
    list. Returns an (n, 3) int array of (query_index[q], pool_index[x], 0), queries in order; a query with fewer
    eligible classes in the pool gets fewer pairs. Distances are computed `chunk` queries at a time.
    """
    query_desc, pool_desc = np.asarray(query_desc, dtype=np.float32), np.asarray(pool_desc, dtype=np.float32)
    query_labels, pool_labels = np.asarray(query_labels), np.asarray(pool_labels)
    query_index, pool_index = np.asarray(query_index), np.asarray(pool_index)
    pool_sq = (pool_desc ** 2).sum(axis=1)
    pairs = []
    for start in range(0, len(query_desc), chunk):
        q = query_desc[start:start + chunk]
        # ‖q − x‖² up to the per-query constant ‖q‖², which does not change the order
        order = np.argsort(pool_sq[None, :] - 2 * q @ pool_desc.T, axis=1, kind="stable")
        ranked_labels = pool_labels[order]
        for row in range(len(q)):
            qi = start + row
            eligible = np.flatnonzero(ranked_labels[row] != query_labels[qi])
            # first (closest) occurrence of every other class, closest classes first
            _, first = np.unique(ranked_labels[row, eligible], return_index=True)
            chosen = order[row, eligible[np.sort(first)[:negatives_per_query]]]
            pairs.append(np.stack([np.full(len(chosen), query_index[qi]), pool_index[chosen], np.zeros(len(chosen), dtype=int)], axis=1))
    return np.concatenate(pairs).astype(np.int64) if pairs else np.empty((0, 3), dtype=np.int64)


class PKBatchSampler(Sampler[list[int]]):
    """Batches of P classes × K images (a `batch_sampler` for a DataLoader).

    Each epoch shuffles the classes into groups of P, so every class comes up about once; the last group is
    completed with other random classes, and extra random batches make the count a multiple of `num_replicas`.
    With `batches`, an epoch has that many (rounded up to a multiple of `num_replicas`): as many such passes over
    the classes as it takes, cut to length.
    A class with fewer than K images is sampled with replacement. All ranks draw the same batch list from
    (seed, epoch) and rank r takes batches r, r + R, …, so ranks get disjoint batches of equal number.
    """

    def __init__(self, labels: np.ndarray, classes_per_batch: int, images_per_class: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, batches: int | None = None) -> None:
        self.labels = np.asarray(labels)
        self.classes = np.unique(self.labels)
        if not 1 <= classes_per_batch <= len(self.classes):
            raise ValueError(f"classes_per_batch must be in [1, {len(self.classes)}], got {classes_per_batch}")
        if images_per_class < 1:
            raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank {rank} of {num_replicas}")
        self.p, self.k, self.seed = classes_per_batch, images_per_class, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.members = {c: np.flatnonzero(self.labels == c) for c in self.classes}
        if batches is not None and batches < 1:
            raise ValueError(f"batches must be >= 1, got {batches}")
        per_pass = math.ceil(len(self.classes) / self.p)
        groups = per_pass if batches is None else batches
        self.passes = math.ceil(groups / per_pass)
        self.total_batches = math.ceil(groups / num_replicas) * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total_batches // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = []
        for _ in range(self.passes):  # each pass: every class once, in a random order
            perm = rng.permutation(self.classes)
            passed = [perm[i:i + self.p] for i in range(0, len(perm), self.p)]
            if len(passed[-1]) < self.p:
                rest = np.setdiff1d(self.classes, passed[-1])
                passed[-1] = np.concatenate([passed[-1], rng.choice(rest, self.p - len(passed[-1]), replace=False)])
            groups += passed
        groups = groups[:self.total_batches]
        groups += [rng.choice(self.classes, self.p, replace=False) for _ in range(self.total_batches - len(groups))]
        batches = [[int(i) for c in group for i in rng.choice(self.members[c], self.k, replace=len(self.members[c]) < self.k)]
                   for group in groups]
        return iter(batches[self.rank::self.num_replicas])
