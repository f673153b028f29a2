"""Build the small committed sample (default data) from the full Caltech-101 folder.

    python tools/make_sample.py ../shared/datasets/caltech101 data/sample

Classes are drawn deterministically with a seed; each kept image is re-encoded as JPEG with its longer side
shrunk to --max-side. A few BACKGROUND_Google images, including the extension-less JPEG `tmp`, are kept so the
default params' class exclusion and decode-by-content paths run on every `dvc repro`.
"""

from __future__ import annotations

import random
from pathlib import Path

import typer
from PIL import Image

BACKGROUND = "BACKGROUND_Google"
NEAR_DUPLICATE_CLASSES = {"Faces_easy"}  # a tighter crop of `Faces`: never both in one sample


def main(
    source: Path,
    target: Path,
    classes: int = 30,
    per_class: int = 24,
    max_side: int = 160,
    background_images: int = 4,
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
    chosen = sorted(random.Random(seed).sample(candidates, classes))
    for name in chosen:
        files = sorted((source / name).iterdir())[:per_class]
        _shrink_all(files, target / name, max_side)
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
