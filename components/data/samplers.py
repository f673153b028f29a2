"""Pair sampling for contrastive training (DeepFirearm: N+ positive and N− negative random pairs per class)."""

from __future__ import annotations

import numpy as np


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
