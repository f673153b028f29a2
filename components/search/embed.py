"""Batched descriptor extraction with a fixed image size (so descriptors never depend on batch composition)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from components.data.datasets import ImageDataset
from components.data.transforms import BatchTransform
from components.models.net import RetrievalNet


@torch.no_grad()
def embed_images(
    net: RetrievalNet,
    uris: Sequence[str],
    *,
    batch_size: int = 32,
    image_size: int | None = None,
    device: torch.device | str = "cpu",
    indices: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "embedding",
) -> tuple[np.ndarray, np.ndarray]:
    """Return (indices, descriptors float32 (n, dim)) for `uris` (or the subset `indices` of them)."""
    dataset = ImageDataset(uris, [0] * len(uris))
    if indices is not None:
        dataset = Subset(dataset, list(indices))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=BatchTransform.for_eval(net.meta, image_size))
    was_training = net.training
    net.eval()
    out_idx, out_desc = [], []
    for images, _, idx in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        out_desc.append(net(images.to(device)).float().cpu().numpy())
        out_idx.append(idx.numpy())
    net.train(was_training)
    dim = net.meta["dim"]
    if not out_desc:
        return np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float32)
    return np.concatenate(out_idx), np.concatenate(out_desc).astype(np.float32)
