"""Contrastive losses on pairs of L2-normalised descriptors."""

from __future__ import annotations

import torch
from torch import nn

from components.losses.pairs import IndicesTuple, ordered_pairs


def double_margin_contrastive(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, pos_margin: float, neg_margin: float,
                              squared: bool = True) -> torch.Tensor:
    """DeepFirearm's double-margin contrastive loss, averaged over pairs:

        L = ½·y·max(0, d − m₊)² + ½·(1 − y)·max(0, m₋ − d)²,   d = ‖a − b‖₂

    or, with `squared=False`, the plain hinge L = ½·y·max(0, d − m₊) + ½·(1 − y)·max(0, m₋ − d).

    Positive pairs already closer than m₊ and negative pairs farther than m₋ cost nothing. With m₊ = 0 this is
    the classic single-margin contrastive loss, which keeps pulling every positive pair together.
    """
    check_margins(pos_margin, neg_margin)
    d = (a - b).pow(2).sum(dim=-1).clamp_min(1e-12).sqrt()
    y = y.to(d.dtype)
    pos = (d - pos_margin).clamp_min(0)
    neg = (neg_margin - d).clamp_min(0)
    if squared:
        pos, neg = pos.pow(2), neg.pow(2)
    return 0.5 * (y * pos + (1 - y) * neg).mean()


def check_margins(pos_margin: float, neg_margin: float) -> None:
    """The double margin's one rule: 0 ≤ m₊ < m₋."""
    if not 0 <= pos_margin < neg_margin:
        raise ValueError(f"need 0 <= pos_margin < neg_margin, got {pos_margin}, {neg_margin}")


class DoubleMarginContrastiveLoss(nn.Module):
    """`double_margin_contrastive` over the pairs of `indices_tuple` (all pairs of the batch when None)."""

    def __init__(self, pos_margin: float, neg_margin: float, squared: bool = True) -> None:
        super().__init__()
        check_margins(pos_margin, neg_margin)
        self.pos_margin, self.neg_margin, self.squared = pos_margin, neg_margin, squared

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                indices_tuple: IndicesTuple | None = None) -> torch.Tensor:
        anchors, others, same = ordered_pairs(labels, indices_tuple)
        return double_margin_contrastive(embeddings[anchors], embeddings[others], same, self.pos_margin,
                                         self.neg_margin, self.squared)


class ContrastiveLoss(DoubleMarginContrastiveLoss):
    """Single-margin contrastive loss (Hadsell et al.): the double-margin loss with m₊ = 0."""

    def __init__(self, margin: float, squared: bool = True) -> None:
        super().__init__(0.0, margin, squared)

