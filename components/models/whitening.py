"""Whitening of global descriptors, as a trainable layer (Gordo et al.: shift + fully connected), fitted training-free
as PCA whitening (optionally shrunk), mean-centering alone, or the supervised learned whitening Lw of matching pairs.

Fit it on descriptors of TRAINING images only. The original DeepFirearm code learned PCA on the test
database it then searched, which is transductive: the evaluation would see statistics of its own gallery.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def fit_pca_whitening(
    descriptors: np.ndarray, dim: int | None = None, eps: float = 1e-6, *, shrinkage: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """PCA whitening (μ, P) of training descriptors X (n, D), so that P(x − μ) has identity covariance.

    C = (1/n) Σ (x − μ)(x − μ)ᵀ = U Λ Uᵀ with λ₁ ≥ … ≥ λ_D;  P = diag((λ'_i + ε·λ'₁)^(−1/2)) U_{:, :dim}ᵀ with the
    shrunk eigenvalues λ'_i = (1 − s)·λ_i + s·mean(λ) (Ledoit-Wolf style, towards tr(C)/D · I): s = 0 is plain
    whitening, s = 1 only centres and rotates (every direction scaled alike). ε is relative to the largest
    eigenvalue, so (near-)constant channels are not blown up. Centred data span at most n − 1 directions, hence
    dim ≤ min(D, n − 1). Returns mean (D,) and projection (dim, D), float32.
    """
    x = _check_descriptors(descriptors)
    n, d = x.shape
    dim = _check_dim(dim, d, n)
    _check_regularisation(eps, shrinkage)
    mean = x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)  # X − μ = W Σ Vᵀ: U = V, λ = σ²/n
    eigval = singular**2 / n
    if eigval[0] == 0:
        raise ValueError("descriptors are all identical: nothing to whiten")
    eigval = _shrink(eigval, d, shrinkage)[:dim]
    projection = vt[:dim] / np.sqrt(eigval + eps * eigval[0])[:, None]
    return mean.astype(np.float32), projection.astype(np.float32)


def fit_centering(descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean-centering alone, in whitening form: μ = (1/n) Σ x and P = I (D, D), so P(x − μ) = x − μ. float32."""
    x = _check_descriptors(descriptors, min_rows=1)
    return x.mean(axis=0).astype(np.float32), np.eye(x.shape[1], dtype=np.float32)


def matching_pair_covariance(descriptors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """C_S = Σ_{(i, j) matching} (x_i − x_j)(x_i − x_j)ᵀ / #pairs over all unordered same-label pairs, float64 (D, D).

    Closed form, without materialising pairs: for a class c of n_c items with mean m_c, the sum over ordered pairs
    Σ_{i,j∈c} (x_i − x_j)(x_i − x_j)ᵀ = 2n_c Σ_i x_i x_iᵀ − 2(Σ_i x_i)(Σ_i x_i)ᵀ = 2n_c Σ_i (x_i − m_c)(x_i − m_c)ᵀ,
    so over unordered pairs it is n_c Σ_i (x_i − m_c)(x_i − m_c)ᵀ, and #pairs = Σ_c n_c(n_c − 1)/2.
    Singleton classes form no pair. Raises if no class has two items.
    """
    x = _check_descriptors(descriptors, min_rows=1)
    inverse, counts = _class_index(labels, len(x))
    pairs = float((counts * (counts - 1)).sum() / 2)
    if pairs == 0:
        raise ValueError("no class has 2 or more descriptors: there is no matching pair to learn a whitening from")
    class_means = np.zeros((len(counts), x.shape[1]))
    np.add.at(class_means, inverse, x)
    centred = x - (class_means / counts[:, None])[inverse]
    return (centred * counts[inverse, None]).T @ centred / pairs


def fit_learned_whitening(
    descriptors: np.ndarray,
    labels: np.ndarray,
    dim: int | None = None,
    *,
    shrinkage: float = 0.0,
    eps: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:
    """Supervised learned whitening "Lw" (Radenović, Tolias, Chum, TPAMI 2018) from same-label pairs.

    Over the descriptors that lie in a matching pair (classes with ≥ 2 items; singletons are ignored): μ their mean,
    C_S the matching-pair difference covariance (`matching_pair_covariance`) and C_D = (1/n) Σ (x − μ)(x − μ)ᵀ.
    C_S = U Λ Uᵀ gives C_S^(−1/2) = U diag((λ'_i + ε·λ'₁)^(−1/2)) Uᵀ, with λ' shrunk as in `fit_pca_whitening`;
    the whitened descriptors' covariance C_D' = C_S^(−1/2) C_D C_S^(−1/2) = V Σ Vᵀ gives the rotation, and
    P = V_{:, :dim}ᵀ C_S^(−1/2): matching differences get identity covariance, the top-dim directions of the
    remaining variance are kept. dim ≤ min(D, n − 1). Returns mean (D,) and projection (dim, D), float32.
    """
    x = _check_descriptors(descriptors)
    inverse, counts = _class_index(labels, len(x))
    paired = counts[inverse] >= 2
    x, labels = x[paired], np.asarray(labels)[paired]
    if len(x) == 0:
        raise ValueError("no class has 2 or more descriptors: there is no matching pair to learn a whitening from")
    n, d = x.shape
    dim = _check_dim(dim, d, n)
    _check_regularisation(eps, shrinkage)
    eigval, eigvec = np.linalg.eigh(matching_pair_covariance(x, labels))
    eigval, eigvec = np.maximum(eigval[::-1], 0.0), eigvec[:, ::-1]  # descending; round-off below 0 clipped
    if eigval[0] == 0:
        raise ValueError("matching descriptors are identical within every class: nothing to whiten")
    eigval = _shrink(eigval, d, shrinkage)
    inv_sqrt = (eigvec / np.sqrt(eigval + eps * eigval[0])) @ eigvec.T  # C_S^(−1/2), symmetric
    mean = x.mean(axis=0)
    whitened = (x - mean) @ inv_sqrt  # rows C_S^(−1/2)(x − μ)
    _, rot = np.linalg.eigh(whitened.T @ whitened / n)  # C_D', ascending
    projection = rot[:, ::-1][:, :dim].T @ inv_sqrt
    return mean.astype(np.float32), projection.astype(np.float32)


def _check_descriptors(descriptors: np.ndarray, min_rows: int = 2) -> np.ndarray:
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(f"descriptors must be a 2-D array with at least {min_rows} rows, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("descriptors hold NaN or infinite values")
    return x


def _check_dim(dim: int | None, d: int, n: int) -> int:
    dim = d if dim is None else dim
    if not 1 <= dim <= min(d, n - 1):
        raise ValueError(
            f"whitening dim must be in [1, min(D, n - 1)] = [1, {min(d, n - 1)}] for {n} descriptors of size {d}, "
            f"got {dim}; use more training descriptors or a smaller dim"
        )
    return dim


def _check_regularisation(eps: float, shrinkage: float) -> None:
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")


def _shrink(eigval: np.ndarray, d: int, shrinkage: float) -> np.ndarray:
    """(1 − s)·λ_i + s·mean(λ) over all D eigenvalues (those past len(eigval) are 0); exactly λ for s = 0."""
    return (1.0 - shrinkage) * eigval + shrinkage * eigval.sum() / d


def _class_index(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(class index of each item (n,), item count of each class)."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), one per descriptor, got {labels.shape}")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return inverse, counts


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
