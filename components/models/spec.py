"""NetSpec: how to build a starting network — from a checkpoint, or an architecture with its weights. Training
jobs, evaluation, the ablation and the benchmarks all build their nets from one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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

    def build(self) -> RetrievalNet:
        if self.init_checkpoint:
            net = load_net(Path(self.init_checkpoint))
            net.meta = {**net.meta, "image_size": self.image_size}
        else:
            net = RetrievalNet.create(self.arch, self.pooling, self.image_size, self.weights, self.gem_p)
        net.freeze(self.frozen_stages)
        return net
