"""Batched descriptor extraction at fixed image sizes (so descriptors never depend on batch composition), optionally
multi-scale."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from components.data.datasets import ImageDataset
from components.data.images import decode_side
from components.data.transforms import BatchTransform
from components.models.localise import ObjectCrop, cropped, object_crop_of
from components.models.net import RetrievalNet


@torch.no_grad()
def embed_images(
    net: RetrievalNet,
    uris: Sequence[str],
    *,
    batch_size: int = 32,
    image_size: int | None = None,
    scales: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    indices: Sequence[int] | None = None,
    object_crop: ObjectCrop | None = None,
    progress: bool = False,
    desc: str = "embedding",
) -> tuple[np.ndarray, np.ndarray]:
    """Return (indices, descriptors float32 (n, dim)) for `uris` (or the subset `indices` of them).

    Multi-scale: with S = image_size (default: the net's), each image is embedded at longer side round(s·S) for
    every s in `scales` and d = L2(Σ_s d_s), then the net's whitening (`RetrievalNet.describe`;
    cnnimageretrieval-pytorch averages: the same after L2). scales None: the net's meta["scales"], else (1.0,).
    Object crops (components.models.localise): `object_crop`, else the net's meta["object_crop"], crops each image
    to its activation box (found at S) before it is described. JPEGs are draft-decoded as the meta says
    (`decode_side`).
    """
    transforms = BatchTransform.for_scales(net.meta, image_size, scales)
    crop = object_crop or object_crop_of(net.meta)
    dataset = ImageDataset(uris, [0] * len(uris), decode_side(net.meta, image_size, scales, crop is not None))
    if indices is not None:
        dataset = Subset(dataset, list(indices))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=list)  # images decoded once
    modes = {m: m.training for m in net.modules()}  # restored module by module: a caller's frozen BatchNorm stays so
    net.eval()
    out_idx, out_desc = [], []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        images = [(im,) for im in cropped(net, [item[0] for item in batch], crop, image_size, device)]
        d = net.describe([transform(images)[0].to(device) for transform in transforms])
        out_desc.append(d.float().cpu().numpy())
        out_idx.append(np.array([item[2] for item in batch], dtype=np.int64))
    for module, training in modes.items():
        module.training = training
    dim = net.meta["dim"]
    if not out_desc:
        return np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float32)
    return np.concatenate(out_idx), np.concatenate(out_desc).astype(np.float32)
