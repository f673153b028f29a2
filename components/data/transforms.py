"""Batch preprocessing: resize the longer side to S, normalise, pad to S×S so any aspect ratio batches.

Padding is added after normalisation with zeros, i.e. the dataset mean, centred. Training draws one random S
per batch from a range (DeepFirearm: [256, 384]) and may flip, colour-jitter and slightly rotate each image at
random; evaluation uses a fixed S and no augmentation, so an image's descriptor never depends on the batch it is in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import v2


class BatchTransform:
    """Collate function: list of (PIL image, *fields) → (images (B,3,S,S), *stacked fields)."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        max_side: tuple[int, int],
        hflip: bool = False,
        seed: int | None = None,
        rotation_degrees: float = 0.0,
        color_jitter: float = 0.0,
    ) -> None:
        """rotation_degrees: rotate each image by U(−r, r)° (bilinear; corners filled with 0 = the mean, like the
        padding). color_jitter: brightness, contrast and saturation factors drawn from U(max(0, 1 − j), 1 + j),
        before normalisation. 0 disables either. The flip and both augmentations draw from torch's global RNG.
        """
        lo, hi = max_side
        if not 0 < lo <= hi:
            raise ValueError(f"max_side must be (low, high) with 0 < low <= high, got {max_side}")
        if rotation_degrees < 0 or color_jitter < 0:
            raise ValueError(f"rotation_degrees and color_jitter must be >= 0, got {rotation_degrees}, {color_jitter}")
        self.max_side = (lo, hi)
        self.to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        self.normalize = v2.Normalize(list(mean), list(std))
        self.flip = v2.RandomHorizontalFlip() if hflip else None
        self.jitter = v2.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
        self.rotate = (
            v2.RandomRotation(rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)
            if rotation_degrees > 0
            else None
        )
        self.rng = random.Random(seed)

    @classmethod
    def for_eval(cls, meta: dict, image_size: int | None = None) -> BatchTransform:
        size = image_size or meta["image_size"]
        return cls(meta["mean"], meta["std"], (size, size))

    @classmethod
    def for_scales(cls, meta: dict, image_size: int | None = None,
                   scales: Sequence[float] | None = None) -> list[BatchTransform]:
        """One eval transform per scale s, at longer side round(s · S) (S: image_size, else the meta's); scales None:
        the meta's `scales`, else one scale."""
        scales = list(meta.get("scales", [1.0]) if scales is None else scales)
        if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
            raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales}")
        size = image_size or meta["image_size"]
        sides = [round(s * size) for s in scales]
        if min(sides) < 1:
            raise ValueError(f"scales {scales} of image size {size} give sides {sides}: every side must be >= 1 pixel")
        return [cls.for_eval(meta, side) for side in sides]

    def image(self, img: Image.Image, side: int) -> torch.Tensor:
        x = self.to_tensor(img)
        x = v2.functional.resize(x, size=None, max_size=side, antialias=True) if max(x.shape[-2:]) != side else x
        if self.flip is not None:
            x = self.flip(x)
        if self.jitter is not None:
            x = self.jitter(x)
        x = self.normalize(x)
        if self.rotate is not None:
            x = self.rotate(x)
        return v2.functional.center_crop(x, [side, side])  # pads with zeros (= the mean) up to S×S

    def __call__(self, batch: list[tuple]) -> tuple[torch.Tensor, ...]:
        side = self.rng.randint(*self.max_side)
        images = torch.stack([self.image(item[0], side) for item in batch])
        fields = [torch.as_tensor([item[i] for item in batch]) for i in range(1, len(batch[0]))]
        return (images, *fields)


class PairBatchTransform(BatchTransform):
    """Collate for pairs: list of (img_a, img_b, y, i, j) → (images (2B,3,S,S) as a₁..a_B,b₁..b_B, y, i, j)."""

    def __call__(self, batch: list[tuple]) -> tuple[torch.Tensor, ...]:
        side = self.rng.randint(*self.max_side)
        images = torch.stack([self.image(item[0], side) for item in batch] + [self.image(item[1], side) for item in batch])
        fields = [torch.as_tensor([item[i] for item in batch]) for i in range(2, len(batch[0]))]
        return (images, *fields)
