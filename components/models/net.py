"""RetrievalNet: backbone → pooling → L2 (→ whitening → L2), with the `meta` dict every checkpoint carries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.errors import CheckpointError
from components.models.backbones import (create_backbone, forward_stages, forward_stages_from_trunk, forward_trunk,
                                         freeze_stages, frozen_blocks, stage_layout)
from components.models.pooling import is_multi_level, make_pooling
from components.models.whitening import Whitening
from components.storage import atomic_write_path

CHECKPOINT_FORMAT = 1


class RetrievalNet(nn.Module):
    """Fully-convolutional backbone → global pooling → L2 normalisation → optional whitening (→ L2).

    `meta` holds everything needed to rebuild the network and preprocess images for it:
    arch, pooling (a `POOLINGS` name), pooling_args (its constructor args; absent for the plain poolings), gem_p,
    image_size, mean, std, whitening_dim (None: no whitening layer) and dim, the descriptor size (whitening_dim if
    set, else the pooling's output size `pooled_dim`: the backbone's channel count for MAC/SPoC/GeM/R-MAC). A
    multi-level pooling (multi_level) pools the maps of several backbone stages (`features`). A search
    model's meta (the postprocess stage's) adds scales (multi-scale descriptors at round(s · image_size)),
    object_crop (images cropped to their activation box first: components.models.localise) and reranking.
    """

    def __init__(self, meta: dict[str, Any], weights: str | None = None) -> None:
        super().__init__()
        backbone = create_backbone(meta["arch"], weights)
        self.backbone = backbone.module
        layout = stage_layout(self.backbone) if is_multi_level(meta["pooling"]) else None
        self.pool = make_pooling(meta["pooling"], meta.get("gem_p", 3.0), meta.get("pooling_args"), backbone.dim, layout)
        self.pooled_dim = self.pool.output_dim(backbone.dim)
        whitening_dim = meta.get("whitening_dim")
        self.whitening = None if whitening_dim is None else Whitening(self.pooled_dim, whitening_dim)
        self.meta = {
            **meta,
            "dim": self.pooled_dim if whitening_dim is None else whitening_dim,
            "whitening_dim": whitening_dim,
            "mean": list(backbone.mean),
            "std": list(backbone.std),
        }

    @classmethod
    def create(
        cls, arch: str, pooling: str, image_size: int, weights: str | None, gem_p: float = 3.0,
        pooling_args: dict[str, Any] | None = None,
    ) -> RetrievalNet:
        """A new net; `pooling_args` (a pooling's `{name, args}` args) go into its meta only when given."""
        extra = {"pooling_args": dict(pooling_args)} if pooling_args else {}
        return cls({"arch": arch, "pooling": pooling, **extra, "gem_p": gem_p, "image_size": image_size}, weights)

    def features(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The pooling's input: the backbone's final feature map (B, C, h, w), or for a multi-level pooling the list
        of the maps of its `stages` (blocks) and, last, the final map — computed in one pass, the same layers."""
        if self.pool.multi_level:
            return forward_stages(self.backbone, images, self.pool.stages)
        return self.backbone.forward_features(images)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, un-normalised features (B, dim): what a classification head sees."""
        return self.pool(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.describe([images])

    def describe(self, scaled: Sequence[torch.Tensor]) -> torch.Tensor:
        """The descriptor of a batch given at one or more scales: L2(Σ_s L2(pool(f(x_s)))), then the whitening layer
        if any — whitening applies to the multi-scale descriptor, as it was fit. One scale: L2(pool(f(x)))."""
        x = F.normalize(self.pooled(scaled[0]), dim=-1)
        if len(scaled) > 1:
            x = F.normalize(x + sum(F.normalize(self.pooled(s), dim=-1) for s in scaled[1:]), dim=-1)
        return x if self.whitening is None else self.whitening(x)

    def frozen_trunk(self) -> int:
        """How many backbone blocks (with the stem) are frozen: the trunk whose output `describe_from_trunk` continues
        from (0: the stem alone); ValueError when nothing before the pooling is frozen, or when a multi-level pooling
        fuses a block inside the trunk (its map is not the trunk's output)."""
        n = frozen_blocks(self.backbone)
        if n < 0:
            raise ValueError("no frozen trunk: the backbone's stem trains (model.frozen_stages is 0)")
        if self.pool.multi_level and min(self.pool.stages) < n - 1:
            raise ValueError(f"a multi-level pooling of blocks {list(self.pool.stages)} reads maps inside the frozen "
                             f"trunk of {n} blocks: it can start from a trunk only if it fuses blocks >= {n - 1}")
        return n

    def trunk(self, images: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The stem and the first `n_blocks` backbone blocks' output."""
        return forward_trunk(self.backbone, images, n_blocks)

    def describe_from_trunk(self, trunk: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The one-scale descriptor from `trunk(images, n_blocks)`: equal to `describe([images])`."""
        maps = forward_stages_from_trunk(self.backbone, trunk, n_blocks, self.pool.stages if self.pool.multi_level else ())
        x = F.normalize(self.pool(maps if self.pool.multi_level else maps[-1]), dim=-1)
        return x if self.whitening is None else self.whitening(x)

    def set_whitening(self, mean: np.ndarray | torch.Tensor, projection: np.ndarray | torch.Tensor) -> None:
        """Add (or replace) a trainable whitening layer y = L2(P(x − μ)) initialised from a fitted PCA.

        (mean, projection) come from `fit_pca_whitening` on un-whitened descriptors of training images.
        """
        layer = Whitening.from_pca(mean, projection)
        if layer.input_dim != self.pooled_dim:
            raise ValueError(
                f"whitening expects {layer.input_dim}-dim input, the pooled descriptors have {self.pooled_dim}"
            )
        self.whitening = layer.to(next(self.backbone.parameters()).device)
        self.meta = {**self.meta, "dim": layer.dim, "whitening_dim": layer.dim}

    def freeze(self, n_stages: int) -> None:
        freeze_stages(self.backbone, n_stages)


class Classifier(nn.Module):
    """A linear head on RetrievalNet's pooled features (stage 1: classification fine-tuning)."""

    def __init__(self, net: RetrievalNet, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.head = nn.Linear(net.pooled_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.net.pooled(images))


def freeze_batchnorm_statistics(module: nn.Module) -> None:
    """Keep BatchNorm running statistics fixed (eval mode) while the rest trains.

    Small, class-correlated batches (pairs) would otherwise drag the statistics, and frozen statistics keep
    data-parallel replicas bit-identical without buffer synchronisation.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def save_checkpoint(path: Path, net: RetrievalNet, extra_meta: dict[str, Any] | None = None) -> None:
    """Write {'format', 'meta', 'state_dict'} atomically; loadable with `weights_only=True`."""
    meta = {**net.meta, **(extra_meta or {})}
    with atomic_write_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "meta": meta, "state_dict": net.state_dict()}, tmp)


def read_checkpoint(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(ckpt, dict) or "meta" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Firesight checkpoint (no 'meta'/'state_dict')")
    return ckpt


def load_net(path: Path) -> RetrievalNet:
    """Rebuild a RetrievalNet from a checkpoint alone (no side information needed)."""
    return net_from_checkpoint(read_checkpoint(path))


def net_from_checkpoint(ckpt: dict[str, Any]) -> RetrievalNet:
    """The RetrievalNet of a checkpoint's {'meta', 'state_dict'} (as read from a file, or shipped to a worker)."""
    net = RetrievalNet(ckpt["meta"], weights=None)
    net.load_state_dict(ckpt["state_dict"])
    net.meta = ckpt["meta"]
    return net.eval()
