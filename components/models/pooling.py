"""Global pooling of a conv feature map (B, C, H, W) into one vector per image (B, C)."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from components.registry import Registry, Spec


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


@lru_cache(maxsize=256)
def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """R-MAC regions (y, x, hh, ww) of an h×w map, by the sampling rule of Tolias et al. (2016).

    Level l = 1..L holds square regions of side s_l = ⌊2·m/(l+1)⌋ with m = min(h, w). Along the long side,
    level l has l + e regions, where e is chosen once per map: with b_k = (max(h, w) − m)/(k − 1) the stride
    that k ∈ {2..7} regions of side m need, e = k* − 1 for k* = argmin_k |(m² − m·b_k)/m² − overlap|
    (e = 0 for square maps). Along the short side level l has l regions. n regions of side s along a side of
    length n_px start at ⌊i·(n_px − s)/(n − 1)⌋, i = 0..n−1 (a single region starts at 0). Levels whose side
    rounds to 0 are skipped. A square map thus has 1 + 4 + 9 = 14 regions for L = 3.
    """
    if h < 1 or w < 1 or levels < 1:
        raise ValueError(f"need h, w, levels >= 1, got h={h}, w={w}, levels={levels}")
    m = min(h, w)
    extra = 0
    if h != w:
        strides = [(max(h, w) - m) / (k - 1) for k in range(2, 8)]
        extra = 1 + min(range(len(strides)), key=lambda i: abs((m * m - m * strides[i]) / (m * m) - overlap))
    extra_h, extra_w = (extra, 0) if h > w else (0, extra)
    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * m / (level + 1))
        if side == 0:
            continue
        ys = _region_starts(h, side, level + extra_h)
        xs = _region_starts(w, side, level + extra_w)
        regions.extend((y, x, side, side) for y in ys for x in xs)
    return regions


def _region_starts(length: int, side: int, n: int) -> list[int]:
    step = (length - side) / (n - 1) if n > 1 else 0.0
    return [math.floor(i * step) for i in range(n)]


class RMAC(nn.Module):
    """Regional MAC (Tolias et al.): Σ_r MAC(x_r)/‖MAC(x_r)‖ over the regions of `rmac_regions`.

    The sum is not normalised here; RetrievalNet applies the final L2.
    """

    def __init__(self, levels: int = 3, overlap: float = 0.4, eps: float = 1e-6) -> None:
        super().__init__()
        self.levels = levels
        self.overlap = overlap
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        regions = rmac_regions(x.shape[-2], x.shape[-1], self.levels, self.overlap)
        macs = torch.stack([x[..., y : y + hh, xx : xx + ww].amax(dim=(-2, -1)) for y, xx, hh, ww in regions], dim=1)
        return F.normalize(macs, dim=-1, eps=self.eps).sum(dim=1)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, overlap={self.overlap}"


POOLINGS = Registry("pooling", {"mac": MAC, "spoc": SPoC, "gem": GeM, "rmac": RMAC})


def make_pooling(name: str, gem_p: float = 3.0) -> nn.Module:
    """The pooling named `name` (GeM with initial exponent `gem_p`)."""
    return POOLINGS.build(Spec(name), p=gem_p)
