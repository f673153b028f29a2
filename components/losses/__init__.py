"""Retrieval losses, all called as `loss(embeddings, labels, indices_tuple=None)` (pytorch-metric-learning's
signature): Firesight's own next to pytorch-metric-learning's, selected by name from `LOSSES`. A loss with
parameters of its own (heads, proxies) is trained with the net; `num_classes` and `embedding_size` are given to
those whose constructors ask for them."""

from pytorch_metric_learning import losses as pml_losses

from components.losses.contrastive import DoubleMarginContrastiveLoss
from components.losses.coupled_clusters import CoupledClustersLoss
from components.losses.triplet import BatchHardTripletLoss
from components.losses.verification import SiameseIdVerLoss
from components.registry import Registry

LOSSES = Registry("loss", {
    "double_margin_contrastive": DoubleMarginContrastiveLoss,  # DeepFirearm (pos_margin 0: single margin)
    "batch_hard_triplet": BatchHardTripletLoss,                # Hermans et al.; P×K batches
    "coupled_clusters": CoupledClustersLoss,                   # Liu et al. 2016; P×K batches
    "siamese_id_verification": SiameseIdVerLoss,              # Zheng et al.
    "multi_similarity": pml_losses.MultiSimilarityLoss,        # Wang et al. 2019
    "proxy_anchor": pml_losses.ProxyAnchorLoss,                # Kim et al. 2020
    "arcface": pml_losses.ArcFaceLoss,                         # Deng et al. 2019
})
