"""The coupled clusters loss (Liu et al., "Deep Relative Distance Learning: Tell the Difference Between Similar
Vehicles", CVPR 2016): a positive set is pulled towards its own centre and the negative nearest to that centre is
pushed beyond every positive by a margin, on squared Euclidean distances."""

from __future__ import annotations

import torch
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import nn

from components.losses.pairs import IndicesTuple


def coupled_clusters_loss(embeddings: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                          margin: float) -> torch.Tensor:
    """The coupled clusters loss of G coupled clusters, averaged over them. Row g of the (G, B) boolean masks
    `positives` / `negatives` picks the positive set P and the negative set N of cluster g among the B embeddings f:

        c   = (1/|P|) Σ_{p∈P} f_p                                (the positive centre)
        n*  = argmin_{n∈N} ‖f_n − c‖₂²                           (the negative nearest to it)
        L_g = (1/|P|) Σ_{p∈P} ½ max(0, ‖f_p − c‖₂² − ‖f_n* − c‖₂² + α)
        L   = mean_g L_g

    As in the paper's gradients (∂L/∂f_p = f_p − c and ∂L/∂f_n* = c − f_n* for every active term, 0 otherwise, up to
    the 1/|P| and 1/G of the averages), the centre c is a constant of the back-propagation: positives are pulled
    towards it and the nearest negative pushed away from it, the centre itself receives no gradient. The paper sums
    over P; the average here only rescales the loss by 1/|P| (a constant under P×K batches).

    Clusters with fewer than two positives or without a negative are skipped; none left is an error.
    """
    positives, negatives = positives.bool(), negatives.bool()
    valid = (positives.sum(dim=1) >= 2) & negatives.any(dim=1)
    if not valid.any():
        raise ValueError("no coupled cluster (at least 2 positives and a negative) can be formed from the batch")
    positives, negatives = positives[valid], negatives[valid]
    count = positives.sum(dim=1, keepdim=True).to(embeddings.dtype)
    centres = ((positives.to(embeddings.dtype) @ embeddings) / count).detach()
    d2 = (embeddings.unsqueeze(0) - centres.unsqueeze(1)).pow(2).sum(dim=-1)            # (G, B): ‖f_j − c_g‖²
    nearest_negative = d2.masked_fill(~negatives, float("inf")).amin(dim=1, keepdim=True)
    hinge = 0.5 * (d2 - nearest_negative + margin).clamp_min(0)
    return ((hinge * positives).sum(dim=1) / count.squeeze(1)).mean()


def class_clusters(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One coupled cluster per class of the batch: P = its images, N = every other image."""
    positives = labels.unsqueeze(0) == labels.unique().unsqueeze(1)
    return positives, ~positives


def anchor_clusters(labels: torch.Tensor, indices_tuple: IndicesTuple) -> tuple[torch.Tensor, torch.Tensor]:
    """One coupled cluster per anchor of an index tuple (pairs or triplets): P = the anchor and its positives,
    N = its negatives."""
    a1, p, a2, n = lmu.convert_to_pairs(indices_tuple, labels)
    b = len(labels)
    positives = torch.zeros(b, b, dtype=torch.bool, device=labels.device)
    negatives = torch.zeros_like(positives)
    positives[a1, p] = True
    positives[a1, a1] = True
    negatives[a2, n] = True
    anchors = positives.any(dim=1) & negatives.any(dim=1)
    return positives[anchors], negatives[anchors]


class CoupledClustersLoss(nn.Module):
    """`coupled_clusters_loss` with margin α: one cluster per class of the batch when `indices_tuple` is None (P×K
    batches: the `class_balanced` sampler), else one per anchor of its pairs or triplets (a miner's)."""

    def __init__(self, margin: float) -> None:
        super().__init__()
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                indices_tuple: IndicesTuple | None = None) -> torch.Tensor:
        clusters = class_clusters(labels) if indices_tuple is None else anchor_clusters(labels, indices_tuple)
        return coupled_clusters_loss(embeddings, *clusters, self.margin)
