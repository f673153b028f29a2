"""Learned PCA whitening of global descriptors, as a trainable layer (Gordo et al.: shift + fully connected).

Fit it on descriptors of TRAINING images only. The original DeepFirearm code learned PCA on the test
database it then searched, which is transductive: the evaluation would see statistics of its own gallery.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def fit_pca_whitening(
    descriptors: np.ndarray, dim: int | None = None, eps: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """PCA whitening (μ, P) of training descriptors X (n, D), so that P(x − μ) has identity covariance.

    C = (1/n) Σ (x − μ)(x − μ)ᵀ = U Λ Uᵀ with λ₁ ≥ … ≥ λ_D;  P = diag((λ_i + ε·λ₁)^(−1/2)) U_{:, :dim}ᵀ.
    ε is relative to the largest eigenvalue, so (near-)constant channels are not blown up. Centred data span at
    most n − 1 directions, hence dim ≤ min(D, n − 1). Returns mean (D,) and projection (dim, D), float32.
    """
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"descriptors must be a 2-D array with at least 2 rows, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("descriptors hold NaN or infinite values")
    n, d = x.shape
    dim = d if dim is None else dim
    if not 1 <= dim <= min(d, n - 1):
        raise ValueError(
            f"whitening dim must be in [1, min(D, n - 1)] = [1, {min(d, n - 1)}] for {n} descriptors of size {d}, "
            f"got {dim}; use more training descriptors or a smaller dim"
        )
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    mean = x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)  # X − μ = W Σ Vᵀ: U = V, λ = σ²/n
    eigval = singular[:dim] ** 2 / n
    if eigval[0] == 0:
        raise ValueError("descriptors are all identical: nothing to whiten")
    projection = vt[:dim] / np.sqrt(eigval + eps * eigval[0])[:, None]
    return mean.astype(np.float32), projection.astype(np.float32)


class Whitening(nn.Module):
    """y = (P(x − μ)) / ‖P(x − μ)‖ with a trainable shift μ (D,) and projection P (dim, D).

    Initialised to μ = 0 and the first `dim` rows of the identity; `from_pca` loads a fitted whitening.
    """

    def __init__(self, input_dim: int, dim: int) -> None:
        super().__init__()
        if not 1 <= dim <= input_dim:
            raise ValueError(f"whitening dim must be in [1, {input_dim}], got {dim}")
        self.shift = nn.Parameter(torch.zeros(input_dim))
        self.projection = nn.Linear(input_dim, dim, bias=False)
        with torch.no_grad():
            self.projection.weight.copy_(torch.eye(dim, input_dim))

    @classmethod
    def from_pca(cls, mean: np.ndarray | torch.Tensor, projection: np.ndarray | torch.Tensor) -> Whitening:
        mean = torch.as_tensor(mean, dtype=torch.float32)
        projection = torch.as_tensor(projection, dtype=torch.float32)
        if projection.ndim != 2 or mean.shape != (projection.shape[1],):
            raise ValueError(
                f"expected mean (D,) and projection (dim, D), got {tuple(mean.shape)} and {tuple(projection.shape)}"
            )
        layer = cls(projection.shape[1], projection.shape[0])
        with torch.no_grad():
            layer.shift.copy_(mean)
            layer.projection.weight.copy_(projection)
        return layer

    @property
    def input_dim(self) -> int:
        return self.projection.in_features

    @property
    def dim(self) -> int:
        return self.projection.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(x - self.shift), dim=-1)
