"""Accuracy per cost: test mAP against training wall time for the backbone and pooling choices, each a whole
`dvc repro` (classify, retrieval, index, evaluate; ingest and split run once) in one fresh clone of this checkout;
plus the method rows of the ablation as docs/ablation.json recorded them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.pipeline import NO_SEARCH, QUICK_OVERRIDES, RepoCopy, pipeline_params

ABLATION = Path("docs/ablation.json")
TRAINING_STAGES = ("classify", "retrieval")
CHOICES = {
    "quick": [("tf_efficientnet_lite0", "gem"), ("tf_efficientnet_lite0", "mac")],
    "full": [("tf_efficientnet_lite0", p) for p in ("mac", "spoc", "gem", "rmac")] + [("tf_efficientnet_lite2", "gem")],
}


def run(mode: str) -> dict[str, Any]:
    overrides = QUICK_OVERRIDES if mode == "quick" else NO_SEARCH  # the paper-style margins for every choice
    params = pipeline_params(False, overrides)
    copy = RepoCopy()
    rows = []
    try:
        for backbone, pooling in CHOICES[mode]:
            copy.write_params({**params, "model": {**params["model"], "backbone": backbone, "pooling": pooling}})
            record = copy.run(["dvc", "repro"])
            metrics = copy.read_metrics("metrics.json") if record["returncode"] == 0 else {}
            training = [copy.read_metrics(f"metrics/{s}.json").get("wall_seconds") if metrics else None
                        for s in TRAINING_STAGES]
            rows.append({"backbone": backbone, "pooling": pooling, "test_map": metrics.get("test", {}).get("map"),
                         "off_the_shelf_map": metrics.get("off_the_shelf", {}).get("map"),
                         "training_seconds": round(sum(t or 0 for t in training), 1),
                         **{f"{s}_seconds": t for s, t in zip(TRAINING_STAGES, training)}, **record})
    finally:
        copy.close()
    return {"data": "sample (params.yaml)", "overrides": overrides, "choices": rows,
            "ablation": json.loads(ABLATION.read_text()) if ABLATION.is_file() else [], "goals": []}
