"""Siamese identification + verification loss (Zheng et al., "A Discriminatively Learned CNN Embedding for Person
Re-identification") and the schedule that grows the share of negative pairs over training."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


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
    """Verification plus identification of both images of a pair:

        L = w_ver·CE(V(f1, f2), y) + w_id·(CE(W·f1 + b, c1) + CE(W·f2 + b, c2))

    with V the verification head and W, b an identification classifier over the training classes; both are
    parameters of the loss and must be given to the optimiser. Defaults are the paper's weights 1 / 0.5 / 0.5.
    """

    def __init__(self, dim: int, num_classes: int, ver_weight: float = 1.0, id_weight: float = 0.5) -> None:
        super().__init__()
        self.verification = VerificationHead(dim)
        self.identification = nn.Linear(dim, num_classes)
        self.ver_weight, self.id_weight = ver_weight, id_weight

    def forward(self, f1: torch.Tensor, f2: torch.Tensor, y: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
        ver = F.cross_entropy(self.verification(f1, f2), y.long())
        ident = F.cross_entropy(self.identification(f1), c1.long()) + F.cross_entropy(self.identification(f2), c2.long())
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
