"""NetSpec: how to build a starting network — from a checkpoint, or an architecture with its weights. Training
jobs, evaluation, the ablation and the benchmarks all build their nets from one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.data.images import DRAFT_DECODE
from components.models.net import RetrievalNet, load_net


@dataclass(frozen=True)
class NetSpec:
    arch: str
    pooling: str
    gem_p: float
    image_size: int
    weights: str | None
    frozen_stages: int
    init_checkpoint: str | None = None
    pooling_args: Mapping[str, Any] | None = None  # the pooling's args (None: a plain pooling, MAC/SPoC/GeM/R-MAC)
    draft_decode: bool = False  # its images may be JPEG-decoded at reduced scale (components.data.transforms)

    def build(self) -> RetrievalNet:
        """From `init_checkpoint` (its own pooling, as its meta says), else a new net of this arch and pooling."""
        if self.init_checkpoint:
            net = load_net(Path(self.init_checkpoint))
            net.meta = {**net.meta, "image_size": self.image_size}
        else:
            net = RetrievalNet.create(self.arch, self.pooling, self.image_size, self.weights, self.gem_p,
                                      dict(self.pooling_args) if self.pooling_args else None)
        net.meta = {k: v for k, v in net.meta.items() if k != DRAFT_DECODE}  # a checkpoint's setting is replaced
        if self.draft_decode:
            net.meta[DRAFT_DECODE] = True
        net.freeze(self.frozen_stages)
        return net
