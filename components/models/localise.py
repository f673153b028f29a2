"""Object-centred crops against clutter, with no box labels and no detector: the network's own activation map says
where the object is (weakly supervised localisation, as class-activation maps do), and the image is cropped to it
before it is described, for queries and database alike.

The map is class-agnostic: A = Σ_c f_c over the channels of the final feature map, i.e. the class-activation map of
a head that weighs every channel alike (SCDA, Wei et al. 2017, localises fine-grained objects this way). A class's
CAM needs that class's weights, and a query of an unseen class has none. The box is the bounding box of the
connected region of cells at or above `threshold` × the peak that holds the peak (Zhou et al. 2016 keep 20% of the
max), grown by `margin` × its size on every side and mapped back through the evaluation's resize and padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from components.data.transforms import BatchTransform


@dataclass(frozen=True)
class ObjectCrop:
    """Crop each image to its activation box before describing it (a search model's meta `object_crop`)."""

    threshold: float = 0.2  # cells >= threshold x the map's peak belong to the object (0 < threshold <= 1)
    margin: float = 0.1  # the box grows by this fraction of its width/height on each side

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"object crop threshold must be in (0, 1], got {self.threshold}")
        if not 0 <= self.margin <= 1:
            raise ValueError(f"object crop margin must be in [0, 1], got {self.margin}")

    def describe(self) -> str:
        return f"object crop (threshold {self.threshold:g}, margin {self.margin:g})"


def object_crop_of(meta: dict) -> ObjectCrop | None:
    """The object crop a network's meta records (the postprocess stage's choice), or None."""
    crop = meta.get("object_crop")
    return ObjectCrop(**crop) if crop else None


def activation_boxes(maps: torch.Tensor, threshold: float) -> np.ndarray:
    """(B, 4) boxes (row0, col0, row1, col1), end-exclusive, in cells of the (B, C, h, w) feature maps: the
    8-connected region of A = Σ_c relu(f_c) at or above `threshold` × max(A) that contains the peak (the whole map
    when A is flat)."""
    activation = maps.detach().float().clamp(min=0).sum(dim=1).cpu().numpy()  # (B, h, w)
    boxes = np.zeros((len(activation), 4), dtype=np.int64)
    for i, a in enumerate(activation):
        peak = np.unravel_index(np.argmax(a), a.shape)
        if a[peak] <= 0:
            boxes[i] = (0, 0, *a.shape)
            continue
        regions, _ = ndimage.label(a >= threshold * a[peak], structure=np.ones((3, 3)))
        rows, cols = np.nonzero(regions == regions[peak])
        boxes[i] = (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
    return boxes


def image_box(cells: Sequence[int], grid: tuple[int, int], side: int, size: tuple[int, int],
              margin: float) -> tuple[int, int, int, int]:
    """A box in map cells → (left, top, right, bottom) pixels of the original (width, height) image, grown by
    `margin`: the map covers the side×side canvas of `BatchTransform` (the image resized to longer side `side`,
    centred, padded), so cells go to canvas pixels, then off the padding and back through the resize."""
    width, height = size
    scale = side / max(width, height)
    resized = (round(width * scale), round(height * scale))
    pad_left, pad_top = (side - resized[0]) // 2, (side - resized[1]) // 2  # torchvision's center_crop padding
    row0, col0, row1, col1 = cells
    h, w = grid
    left, right = (col0 * side / w - pad_left) / scale, (col1 * side / w - pad_left) / scale
    top, bottom = (row0 * side / h - pad_top) / scale, (row1 * side / h - pad_top) / scale
    grow_x, grow_y = margin * (right - left), margin * (bottom - top)
    left, right = max(0.0, left - grow_x), min(float(width), right + grow_x)
    top, bottom = max(0.0, top - grow_y), min(float(height), bottom + grow_y)
    box = (int(np.floor(left)), int(np.floor(top)), int(np.ceil(right)), int(np.ceil(bottom)))
    if box[2] <= box[0] or box[3] <= box[1]:  # the region fell on the padding alone: keep the whole image
        return 0, 0, width, height
    return box


@torch.no_grad()
def object_boxes(net, images: Sequence[Image.Image], crop: ObjectCrop, side: int | None = None,
                 device: torch.device | str = "cpu") -> list[tuple[int, int, int, int]]:
    """Each image's object box (left, top, right, bottom) in its own pixels, from `net`'s final feature map at
    longer side `side` (default: the meta's evaluation size)."""
    if not images:
        return []
    side = int(side or net.meta["image_size"])
    batch, = BatchTransform.for_eval(net.meta, side)([(im,) for im in images])
    training = net.training
    net.eval()
    maps = net.backbone.forward_features(batch.to(device))
    net.train(training)
    cells = activation_boxes(maps, crop.threshold)
    return [image_box(c, tuple(maps.shape[-2:]), side, im.size, crop.margin) for c, im in zip(cells, images, strict=True)]


def cropped(net, images: Sequence[Image.Image], crop: ObjectCrop | None, side: int | None = None,
            device: torch.device | str = "cpu") -> list[Image.Image]:
    """The images cropped to their object boxes (`object_boxes`), or unchanged when `crop` is None."""
    if crop is None:
        return list(images)
    return [im.crop(box) for im, box in zip(images, object_boxes(net, images, crop, side, device), strict=True)]
