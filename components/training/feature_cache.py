"""The frozen trunk's outputs, computed once per job.

With the stem and the first backbone blocks frozen (their BatchNorm statistics too), their output is a fixed function
of the preprocessed image. A job that trains at one image size, with mirror flips as its only augmentation, computes
it once for each train image in both views (as is, mirrored) and for each val image, and every step then runs only
the trainable blocks (`RetrievalNet.describe_from_trunk`): the frozen part's forward pass and the JPEG decoding leave
the epoch loop, so many more pairs and epochs fit a CPU budget (DeepFirearm's 180 + 180 pairs per class).

Every rank computes a shard; the train views are gathered on every rank (any rank may draw any image), the val ones
stay sharded (each rank describes its shard, the descriptors are gathered).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from components.data.datasets import ImageDataset
from components.data.transforms import BatchTransform
from components.models.net import RetrievalNet
from components.training.context import WorkerContext, gather_objects

log = logging.getLogger(__name__)


class TrunkCache:
    """Trunk outputs (n, views, C, h, w) of n images; `view(i)` picks one view of image i at random (the mirror with
    probability 1/2 when there are two), from a generator seeded per rank."""

    def __init__(self, maps: torch.Tensor, seed: int) -> None:
        self.maps = maps
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.maps)

    @property
    def nbytes(self) -> int:
        return self.maps.numel() * self.maps.element_size()

    def view(self, i: int) -> torch.Tensor:
        views = self.maps.shape[1]
        pick = 0 if views == 1 else int(torch.randint(views, (1,), generator=self.generator))
        return self.maps[i, pick].float()


@torch.no_grad()
def _trunk_maps(net: RetrievalNet, uris: Sequence[str], indices: list[int], side: int, mirrored: bool,
                n_blocks: int, batch_size: int, ctx: WorkerContext, dtype: torch.dtype) -> torch.Tensor:
    """(len(indices), 1 or 2, C, h, w): the trunk of uris[indices] at longer side `side`, and of their mirror images."""
    transform = BatchTransform.for_eval(net.meta, side)
    loader = DataLoader(Subset(ImageDataset(uris, [0] * len(uris)), indices), batch_size=batch_size, collate_fn=list)
    training = net.training
    net.eval()
    out = []
    for batch in loader:
        images = [item[0] for item in batch]
        views = [images] + ([[im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]] if mirrored else [])
        maps = [net.trunk(transform([(im,) for im in view])[0].to(ctx.device), n_blocks).to("cpu", dtype)
                for view in views]
        out.append(torch.stack(maps, dim=1))
    net.train(training)
    return torch.cat(out) if out else torch.empty(0)


def train_cache(net: RetrievalNet, n_blocks: int, uris: Sequence[str], side: int, mirrored: bool, batch_size: int,
                ctx: WorkerContext, seed: int) -> TrunkCache:
    """Every train image's trunk (the stem and `n_blocks` blocks) at longer side `side` (and its mirror image's),
    float16, complete on every rank."""
    mine = list(range(ctx.rank, len(uris), ctx.world_size))
    parts = gather_objects((mine, _trunk_maps(net, uris, mine, side, mirrored, n_blocks, batch_size, ctx,
                                              torch.float16)))
    maps = torch.empty((len(uris), *parts[0][1].shape[1:]), dtype=torch.float16)
    for positions, part in parts:
        maps[positions] = part
    cache = TrunkCache(maps, seed + ctx.rank)
    log.info("frozen trunk (stem + %d blocks) of %d train images x %d views cached: %s, %.0f MiB", n_blocks,
             len(uris), maps.shape[1], tuple(maps.shape[2:]), cache.nbytes / 2**20)
    return cache


class ValTrunks:
    """This rank's shard of the val images' trunks at the net's evaluation size (float32, so the val figure matches
    the full forward pass's); `describe` gives every val descriptor on every rank."""

    def __init__(self, net: RetrievalNet, n_blocks: int, uris: Sequence[str], batch_size: int, ctx: WorkerContext) -> None:
        self.n_blocks, self.count, self.ctx = n_blocks, len(uris), ctx
        self.positions = list(range(ctx.rank, len(uris), ctx.world_size))
        self.maps = _trunk_maps(net, uris, self.positions, net.meta["image_size"], False, self.n_blocks, batch_size,
                                ctx, torch.float32)[:, 0] if self.positions else torch.empty(0)
        self.batch_size = batch_size

    @torch.no_grad()
    def describe(self, net: RetrievalNet) -> np.ndarray:
        training = net.training
        net.eval()
        mine = [net.describe_from_trunk(self.maps[i:i + self.batch_size].to(self.ctx.device), self.n_blocks).cpu()
                for i in range(0, len(self.positions), self.batch_size)]
        net.train(training)
        parts = gather_objects((self.positions, torch.cat(mine).numpy() if mine else None))
        out = np.empty((self.count, net.meta["dim"]), dtype=np.float32)
        for positions, part in parts:
            if positions:
                out[positions] = part
        return out


class CachedImages(Dataset):
    """Item i: (a view of image i's trunk, label, i) — an `ImageDataset` of cached trunks."""

    def __init__(self, cache: TrunkCache, labels: Sequence[int]) -> None:
        self.cache, self.labels = cache, [int(x) for x in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.cache.view(i), self.labels[i], i


class CachedPairs(Dataset):
    """Item k of pairs (n, 3) = (i, j, y): (a view of i's trunk, one of j's, y, i, j) — a `PairDataset` of trunks."""

    def __init__(self, cache: TrunkCache, pairs: np.ndarray) -> None:
        self.cache, self.pairs = cache, np.asarray(pairs, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int):
        i, j, y = (int(v) for v in self.pairs[k])
        return self.cache.view(i), self.cache.view(j), y, i, j


def stack_images(batch: list[tuple]) -> tuple[torch.Tensor, ...]:
    """Collate of `CachedImages` items, as `BatchTransform` collates images: (trunks (B, C, h, w), labels, i)."""
    return (torch.stack([item[0] for item in batch]),
            *(torch.as_tensor([item[f] for item in batch]) for f in range(1, len(batch[0]))))


def stack_pairs(batch: list[tuple]) -> tuple[torch.Tensor, ...]:
    """Collate of `CachedPairs` items, as `PairBatchTransform` does: (trunks (2B, …) as a₁..a_B, b₁..b_B, y, i, j)."""
    return (torch.stack([item[0] for item in batch] + [item[1] for item in batch]),
            *(torch.as_tensor([item[f] for item in batch]) for f in range(2, len(batch[0]))))
