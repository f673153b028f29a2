"""Growth: how each stage's wall time and peak memory grow with the data. The pipeline runs stage by stage (as the
pipeline section runs it) on three sizes of cub100 — every class capped at a number of images — with the same
training budget per image at every size (one classify epoch; one retrieval epoch of P×K batches in proportion to
the train-class images; no search), and each stage's cost is fitted with a power law, cost ∝ images^b, by least
squares on the logs: b ≈ 1 is linear, b < 1 means fixed costs (imports, Ray start-up, model loading) still weigh,
b > 1 super-linear (all-pairs work such as leave-one-out scoring and k-reciprocal re-ranking)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.pipeline import RepoCopy, run_stages
from pipelines.params import merge_overrides, read_overrides

CUB100 = Path("../shared/datasets/cub100")
CONFIG = Path("configs/cub100-full.yaml")  # its split (40 / 20 / 40 classes) at every size
CAPS = {"quick": (10, 14, 20), "full": (15, 30, None)}  # images per class; None: all (45-60)
TRAIN_CLASS_SHARE = 0.4  # 40 of the 100 classes train
PK_BATCH = 64  # 8 classes × 8 images


def run(mode: str) -> dict[str, Any]:
    if not CUB100.is_dir():
        return {"skipped": f"{CUB100} is not there", "goals": []}
    per_class = [sum(1 for f in d.iterdir() if f.is_file()) for d in sorted(CUB100.iterdir()) if d.is_dir()]
    sizes = []
    copy = RepoCopy()
    try:
        for cap in CAPS[mode]:
            images = sum(n if cap is None else min(n, cap) for n in per_class)
            copy.write_params(growth_params(cap, images))
            rows = run_stages(copy)
            sizes.append({"cap": cap, "images": images, "stages": rows})
            if any(r["returncode"] for r in rows):
                break
    finally:
        copy.close()
    return {"data": f"{CUB100} with {CONFIG}'s split", "sizes": sizes, "fits": fits(sizes), "goals": []}


def growth_params(cap: int | None, images: int) -> dict[str, Any]:
    """params.yaml merged with the cub100 config, every class capped at `cap` images, one epoch of each training
    stage with retrieval batches in proportion to the train-class images, and no search."""
    params = merge_overrides(yaml.safe_load(Path("params.yaml").read_text()), read_overrides(CONFIG))
    params["ingest"] |= {"source": str(CUB100.resolve()), "max_images_per_class": cap}
    params["classify"] |= {"epochs": 1}
    params["retrieval"] |= {"epochs": 1}
    params["retrieval"]["sampler"]["args"] |= {"batches_per_epoch": max(1, round(TRAIN_CLASS_SHARE * images / PK_BATCH))}
    params["tune"] |= {"search": "off"}
    return params


def fits(sizes: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per stage that ran at every size: the exponent b of wall time and of peak PSS against the images."""
    complete = [s for s in sizes if not any(r["returncode"] for r in s["stages"])]
    if len(complete) < 2:
        return {}
    images = np.log([s["images"] for s in complete])
    out = {}
    for i, row in enumerate(complete[0]["stages"]):
        walls = [s["stages"][i]["wall_seconds"] for s in complete]
        memory = [s["stages"][i]["peak_pss_tree_mib"] for s in complete]
        out[row["stage"]] = {"time_exponent": power(images, walls), "memory_exponent": power(images, memory)}
    return out


def power(log_x: np.ndarray, y: list[float]) -> float:
    """b of y ∝ x^b, least squares on the logs."""
    return round(float(np.polyfit(log_x, np.log(np.maximum(y, 1e-9)), 1)[0]), 2)
