"""Map-style datasets over manifest rows; images are decoded lazily by content with PIL."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from components.data.images import load_rgb


class ImageDataset(Dataset):
    """Item i: (RGB image, label index, i); `draft_side`: JPEGs may be decoded at reduced scale down to this longer
    side (`load_rgb`)."""

    def __init__(self, uris: Sequence[str], labels: Sequence[int], draft_side: int | None = None) -> None:
        if len(uris) != len(labels):
            raise ValueError(f"{len(uris)} uris but {len(labels)} labels")
        self.uris = list(uris)
        self.labels = [int(x) for x in labels]
        self.draft_side = draft_side

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int):
        return load_rgb(self.uris[i], draft_side=self.draft_side), self.labels[i], i


class PairDataset(Dataset):
    """Item k of pairs (n, 3) = (i, j, y): (image i, image j, y, i, j); y = 1 for same class."""

    def __init__(self, uris: Sequence[str], pairs: np.ndarray) -> None:
        self.uris = list(uris)
        self.pairs = np.asarray(pairs, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int):
        i, j, y = (int(v) for v in self.pairs[k])
        return load_rgb(self.uris[i]), load_rgb(self.uris[j]), y, i, j
