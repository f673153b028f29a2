"""Descriptors for the search benchmark: real descriptors of the dataset's images, extended to 100k-1M with a
clustered synthetic model fitted to them.

The model is a Gaussian mixture in the real descriptors' own geometry: cluster centres are drawn from a Gaussian
with the real class centroids' mean and principal covariance (between-class spread), members around a centre from
a Gaussian with the real within-class residuals' principal covariance plus their leftover variance spread evenly
over the remaining directions; every vector is then L2-normalised. Cluster sizes are drawn from the real class
sizes. Isotropic Gaussian noise would be a worst case for graph indexes; this keeps the anisotropy and the
clustering of real descriptors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.search.embed import embed_images
from pipelines.common import net_spec
from pipelines.params import ModelParams

CACHE_DIR = Path(".bench_cache")
CHUNK = 65_536


@dataclass(frozen=True)
class Gaussian:
    """mean + basis @ (scales * z) + leftover_std * (noise orthogonal to the basis), z and noise standard normal."""

    mean: np.ndarray
    basis: np.ndarray  # (d, k), orthonormal columns
    scales: np.ndarray  # (k,)
    leftover_std: float

    @classmethod
    def fit(cls, samples: np.ndarray, components: int) -> Gaussian:
        mean = samples.mean(axis=0)
        _, singular, vt = np.linalg.svd(samples - mean, full_matrices=False)
        variances = singular**2 / max(1, len(samples) - 1)
        k = min(components, int((variances > 1e-12).sum()))
        leftover_dims = samples.shape[1] - k
        leftover = float(variances[k:].sum() / leftover_dims) if leftover_dims else 0.0
        return cls(mean.astype(np.float32), vt[:k].T.astype(np.float32), np.sqrt(variances[:k]).astype(np.float32),
                   float(np.sqrt(leftover)))

    def sample(self, n: int, rng: np.random.Generator, centres: np.ndarray | None = None) -> np.ndarray:
        """n draws (around `centres`, one row per draw, instead of the mean when given)."""
        z = rng.standard_normal((n, len(self.scales)), dtype=np.float32)
        noise = rng.standard_normal((n, len(self.mean)), dtype=np.float32) * self.leftover_std
        noise -= (noise @ self.basis) @ self.basis.T  # keep the leftover variance off the principal directions
        return (self.mean if centres is None else centres) + (z * self.scales) @ self.basis.T + noise


@dataclass(frozen=True)
class ClusteredDescriptors:
    between: Gaussian
    within: Gaussian
    cluster_sizes: np.ndarray

    @classmethod
    def fit(cls, descriptors: np.ndarray, labels: Sequence, components: int = 128) -> ClusteredDescriptors:
        labels = np.asarray(labels)
        classes, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
        centroids = np.stack([descriptors[inverse == c].mean(axis=0) for c in range(len(classes))])
        residuals = descriptors - centroids[inverse]
        return cls(Gaussian.fit(centroids, components), Gaussian.fit(residuals, components), sizes)

    def fill(self, out: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Fill `out` (n, d) in place with unit-norm members of new clusters; return each row's cluster id."""
        n = len(out)
        sizes = rng.choice(self.cluster_sizes, size=int(np.ceil(2 * n / self.cluster_sizes.mean())) + 1)
        cluster_of = np.repeat(np.arange(len(sizes)), sizes)[:n]  # twice the clusters needed on average: enough
        centres = self.between.sample(int(cluster_of[-1]) + 1, rng)
        for start in range(0, n, CHUNK):
            rows = slice(start, min(n, start + CHUNK))
            x = self.within.sample(rows.stop - rows.start, rng, centres=centres[cluster_of[rows]])
            out[rows] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return cluster_of


def neighbour_similarity(x: np.ndarray, k: int = 10) -> dict[str, float]:
    """Mean cosine similarity of each row to its nearest other row and to its k-th nearest (exact)."""
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    top = -np.sort(-sims, axis=1)[:, :k]
    return {"nn1": round(float(top[:, 0].mean()), 4), f"nn{k}": round(float(top[:, k - 1].mean()), 4),
            "random_pair": round(float(sims[np.isfinite(sims)].mean()), 4)}


def real_descriptors(model: ModelParams, uris: list[str], batch_size: int) -> np.ndarray:
    """Off-the-shelf descriptors of `uris` (the configured architecture and pooling with ImageNet weights), cached in
    .bench_cache/ by model and image list."""
    key = hashlib.sha256(repr((model.model_dump(), uris)).encode()).hexdigest()[:16]
    path = CACHE_DIR / f"descriptors-{key}.npy"
    if path.is_file():
        return np.load(path)
    _, descriptors = embed_images(net_spec(model).build().eval(), uris, batch_size=batch_size,
                                  image_size=model.image_size, progress=True, desc="real descriptors")
    CACHE_DIR.mkdir(exist_ok=True)
    np.save(path, descriptors)
    return descriptors
