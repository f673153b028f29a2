"""Real images for the benchmarks: the full Caltech-101 of configs/caltech101-full.yaml when it is next to the
checkout (../shared/datasets/caltech101), else the committed sample (data/sample)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.params import load_params

FULL_CONFIG = Path("configs/caltech101-full.yaml")
DEFAULT_PARAMS = Path("params.yaml")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True)
class ImageSet:
    source: str
    uris: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.uris)


def dataset_folder() -> tuple[Path, list[str]]:
    """The class-folder tree to draw images from, and its excluded classes."""
    for overrides in (FULL_CONFIG, None):
        ingest = load_params(DEFAULT_PARAMS, overrides).ingest
        if Path(ingest.source).is_dir():
            return Path(ingest.source), ingest.exclude_classes
    raise FileNotFoundError(f"neither {FULL_CONFIG} nor {DEFAULT_PARAMS} points at an image folder")


def real_images(per_class: int | None = None, classes: int | None = None, limit: int | None = None) -> ImageSet:
    """Up to `per_class` images (sorted by name) of each of the first `classes` classes, interleaved class by class
    so that any prefix covers many classes; at most `limit` in all."""
    root, excluded = dataset_folder()
    folders = sorted(d for d in root.iterdir() if d.is_dir() and d.name not in excluded)[:classes]
    per_folder = [sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[:per_class] for d in folders]
    rows = [(str(files[i].resolve()), d.name) for i in range(max(map(len, per_folder)))
            for d, files in zip(folders, per_folder) if i < len(files)][:limit]
    return ImageSet(str(root), [u for u, _ in rows], [label for _, label in rows])
