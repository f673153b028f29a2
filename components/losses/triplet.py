"""Triplet losses on descriptors (Euclidean distance), with given triplets or mined in the batch."""

from __future__ import annotations

import torch
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import nn

from components.losses.pairs import IndicesTuple


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a − b‖₂ along the last dimension, with a finite gradient at 0."""
    return (a - b).pow(2).sum(dim=-1).clamp_min(1e-12).sqrt()


def triplet_margin_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    """Triplet loss averaged over triplets:

        L = max(0, ‖a − p‖₂ − ‖a − n‖₂ + m)
    """
    return (_distance(anchor, positive) - _distance(anchor, negative) + margin).clamp_min(0).mean()


class TripletLoss(nn.Module):
    def __init__(self, margin: float) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return triplet_margin_loss(anchor, positive, negative, self.margin)


def batch_hard_triplet_loss(descriptors: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al.) for P×K batches, averaged over the valid anchors:

        L = mean_a max(0, max_{p: y_p = y_a, p ≠ a} d(a, p) − min_{n: y_n ≠ y_a} d(a, n) + m)

    Anchors with no positive or no negative in the batch are skipped; a batch without any valid anchor is an error.
    """
    d = _distance(descriptors.unsqueeze(1), descriptors.unsqueeze(0))
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    is_pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    is_neg = ~same
    valid = is_pos.any(dim=1) & is_neg.any(dim=1)
    if not valid.any():
        raise ValueError("no anchor has both a positive and a negative in the batch")
    hardest_pos = d.masked_fill(~is_pos, float("-inf")).amax(dim=1)
    hardest_neg = d.masked_fill(~is_neg, float("inf")).amin(dim=1)
    return (hardest_pos - hardest_neg + margin)[valid].clamp_min(0).mean()


class BatchHardTripletLoss(nn.Module):
    """`batch_hard_triplet_loss` of the batch (P×K batches) when `indices_tuple` is None; otherwise the triplet loss
    of its triplets (pairs are turned into triplets of a shared anchor)."""

    def __init__(self, margin: float) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                indices_tuple: IndicesTuple | None = None) -> torch.Tensor:
        if indices_tuple is None:
            return batch_hard_triplet_loss(embeddings, labels, self.margin)
        a, p, n = lmu.convert_to_triplets(indices_tuple, labels)
        if len(a) == 0:
            raise ValueError("no triplet can be formed from the given indices")
        return triplet_margin_loss(embeddings[a], embeddings[p], embeddings[n], self.margin)
