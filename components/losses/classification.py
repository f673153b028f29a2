"""Class-weighted cross-entropy for the classification stage."""

from __future__ import annotations

import numpy as np
import torch


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """w_c = N / (C · n_c): each class contributes equally to the loss whatever its size."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"classes without training images: {np.flatnonzero(counts == 0).tolist()}")
    return torch.as_tensor(len(labels) / (num_classes * counts), dtype=torch.float32)
