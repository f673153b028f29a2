"""Siamese identification + verification loss (Zheng et al., "A Discriminatively Learned CNN Embedding for Person
Re-identification") and the schedule that grows the share of negative pairs over training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from components.losses.pairs import IndicesTuple, ordered_pairs


def square_difference(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """The square layer: s = (f1 − f2)², elementwise."""
    return (f1 - f2).pow(2)


class VerificationHead(nn.Module):
    """Same/different logits of a pair: Linear(dim, 2) applied to s = (f1 − f2)²; logit 1 is "same" (y = 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 2)

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        return self.fc(square_difference(f1, f2))


class SiameseIdVerLoss(nn.Module):
    """Verification of each pair plus identification of both of its images:

        L = w_ver·CE(V(f1, f2), y) + w_id·(CE(W·f1 + b, c1) + CE(W·f2 + b, c2))

    over the pairs (f1, f2) of `indices_tuple` (all pairs of the batch when None), with V the verification head and
    W, b an identification classifier over the training classes; both are parameters of the loss and must be given
    to the optimiser. Defaults are the paper's weights 1 / 0.5 / 0.5.
    """

    def __init__(self, embedding_size: int, num_classes: int, ver_weight: float = 1.0, id_weight: float = 0.5) -> None:
        super().__init__()
        self.verification = VerificationHead(embedding_size)
        self.identification = nn.Linear(embedding_size, num_classes)
        self.ver_weight, self.id_weight = ver_weight, id_weight

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                indices_tuple: IndicesTuple | None = None) -> torch.Tensor:
        anchors, others, same = ordered_pairs(labels, indices_tuple)
        f1, f2 = embeddings[anchors], embeddings[others]
        ver = F.cross_entropy(self.verification(f1, f2), same.long())
        ident = (F.cross_entropy(self.identification(f1), labels[anchors].long())
                 + F.cross_entropy(self.identification(f2), labels[others].long()))
        return self.ver_weight * ver + self.id_weight * ident


@dataclass(frozen=True)
class NegativeRatioSchedule:
    """Negatives per positive pair at an epoch (counted from 1): r(e) = min(start · growth^(e − 1), max_ratio)."""

    start: float = 1.0
    growth: float = 1.01
    max_ratio: float = 4.0

    def ratio(self, epoch: int) -> float:
        if epoch < 1:
            raise ValueError(f"epochs are counted from 1, got {epoch}")
        return min(self.start * self.growth ** (epoch - 1), self.max_ratio)
