"""Build the small committed sample (default data) from a dataset of class folders.

    python tools/make_sample.py ../shared/datasets/cub100 data/sample          # the default sample
    python tools/make_sample.py ../shared/datasets/caltech101 /tmp/caltech --classes 30 --per-class 24 \
        --max-side 160 --background-images 4

Classes are drawn deterministically with a seed; each kept image is re-encoded as JPEG with its longer side
shrunk to --max-side (never enlarged). With --background-images N and a Caltech-101 source, N BACKGROUND_Google
images are kept too, including the extension-less JPEG `tmp`, so class exclusion and decode-by-content run.
"""

from __future__ import annotations

import random
from pathlib import Path

import typer
from PIL import Image

BACKGROUND = "BACKGROUND_Google"  # Caltech-101's clutter folder: not a class
NEAR_DUPLICATE_CLASSES = {"Faces_easy"}  # Caltech-101: a tighter crop of `Faces`: never both in one sample


def main(
    source: Path,
    target: Path,
    classes: int = 40,
    per_class: int = 20,
    max_side: int = 224,
    background_images: int = 0,
    seed: int = 0,
) -> None:
    if target.exists() and any(target.iterdir()):
        raise typer.BadParameter(f"{target} is not empty; remove it first")
    candidates = sorted(
        d.name
        for d in source.iterdir()
        if d.is_dir() and d.name != BACKGROUND and d.name not in NEAR_DUPLICATE_CLASSES
        and sum(1 for _ in d.iterdir()) >= per_class
    )
    if len(candidates) < classes:
        raise typer.BadParameter(f"{source} has only {len(candidates)} classes with >= {per_class} images")
    chosen = sorted(random.Random(seed).sample(candidates, classes))
    for name in chosen:
        files = sorted((source / name).iterdir())[:per_class]
        _shrink_all(files, target / name, max_side)
    if background_images:
        background = sorted((source / BACKGROUND).iterdir())
        _shrink_all([source / BACKGROUND / "tmp"] + background[:background_images - 1], target / BACKGROUND, max_side)
    print(f"wrote {classes} classes x {per_class} images (+{background_images} background) to {target}")


def _shrink_all(files: list[Path], out_dir: Path, max_side: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            # keep the original name (even without extension): ingest decodes by content
            im.save(out_dir / f.name, format="JPEG", quality=90)


if __name__ == "__main__":
    typer.run(main)
