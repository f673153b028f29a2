"""Global pooling of a conv feature map (B, C, H, W) into one vector per image (B, C)."""

from __future__ import annotations

import torch
from torch import nn


class MAC(nn.Module):
    """Maximum activation of convolutions (Tolias et al.): the spatial max of each channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(-2, -1))


class SPoC(nn.Module):
    """Sum-pooled convolutional features (Babenko & Lempitsky), as a mean so scale does not depend on size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class GeM(nn.Module):
    """Generalised mean (Radenović et al.): p = 1 is SPoC, p → ∞ approaches MAC; p is learnable."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}"


POOLINGS = ("mac", "spoc", "gem")


def make_pooling(name: str, gem_p: float = 3.0) -> nn.Module:
    if name == "mac":
        return MAC()
    if name == "spoc":
        return SPoC()
    if name == "gem":
        return GeM(p=gem_p)
    raise ValueError(f"unknown pooling {name!r}; expected one of {POOLINGS}")
