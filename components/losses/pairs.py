"""Index tuples, the one way a retrieval loss is told which pairs or triplets of a batch to use
(pytorch-metric-learning's convention): pairs are (a1, p, a2, n) — positive pairs (a1[k], p[k]) and negative pairs
(a2[k], n[k]) — and triplets are (a, p, n). Indices are rows of the batch's embeddings."""

from __future__ import annotations

import torch
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

IndicesTuple = tuple[torch.Tensor, ...]


def pair_tuple(same: torch.Tensor) -> IndicesTuple:
    """The pairs of a batch laid out as [x₁..x_B, y₁..y_B] (B pairs (xₖ, yₖ), `same[k]` true for same-class pairs)."""
    same = same.bool()
    first = torch.arange(len(same), device=same.device)
    second = first + len(same)
    return first[same], second[same], first[~same], second[~same]


def ordered_pairs(labels: torch.Tensor, indices_tuple: IndicesTuple | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchors, others, same) of every pair, by anchor row (a pair batch's own order): the pairs of
    `indices_tuple` (triplets become their two pairs), or all pairs of the batch when it is None."""
    a1, p, a2, n = lmu.convert_to_pairs(indices_tuple, labels)
    anchors, others = torch.cat([a1, a2]), torch.cat([p, n])
    same = torch.cat([torch.ones_like(a1, dtype=torch.bool), torch.zeros_like(a2, dtype=torch.bool)])
    order = torch.argsort(anchors, stable=True)
    return anchors[order], others[order], same[order]
