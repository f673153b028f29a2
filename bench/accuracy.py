"""Accuracy per cost: test mAP against training wall time for the backbone and pooling choices, each a whole
`dvc repro` (classify, retrieval, index, evaluate; ingest and split run once) in one fresh clone of this checkout
(a choice the pipeline section just ran with the same params is taken from its run); plus the method rows of the
ablation as docs/ablation.json recorded them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.pipeline import NO_SEARCH, QUICK_OVERRIDES, RepoCopy, headline_maps, pipeline_params

ABLATION = Path("docs/ablation.json")
TRAINING_STAGES = ("classify", "retrieval")
CHOICES = {  # quick: the default choice only, taken from the pipeline section's run when it ran just before
    "quick": [("tf_efficientnet_lite0", "gem")],
    "full": [("tf_efficientnet_lite0", p) for p in ("mac", "spoc", "gem", "rmac")] + [("tf_efficientnet_lite2", "gem")],
}


def run(mode: str, pipeline: dict[str, Any] | None = None) -> dict[str, Any]:
    """`pipeline`: this invocation's pipeline section, whose run stands for a choice it made with the same params."""
    overrides = QUICK_OVERRIDES if mode == "quick" else NO_SEARCH  # the paper-style margins for every choice
    params = pipeline_params(False, overrides)
    rows = [row for row in [_from_pipeline(pipeline, overrides)] if row]
    todo = [c for c in CHOICES[mode] if c not in {(r["backbone"], r["pooling"]) for r in rows}]
    copy = RepoCopy() if todo else None
    try:
        for backbone, pooling in todo:
            copy.write_params({**params, "model": {**params["model"], "backbone": backbone, "pooling": pooling}})
            record = copy.run(["dvc", "repro"])
            metrics = copy.read_metrics("metrics.json") if record["returncode"] == 0 else {}
            training = [copy.read_metrics(f"metrics/{s}.json").get("wall_seconds") if metrics else None
                        for s in TRAINING_STAGES]
            rows.append({"backbone": backbone, "pooling": pooling, **headline_maps(metrics),
                         "training_seconds": round(sum(t or 0 for t in training), 1),
                         **{f"{s}_seconds": t for s, t in zip(TRAINING_STAGES, training)}, **record})
    finally:
        if copy:
            copy.close()
    return {"data": "sample (params.yaml)", "overrides": overrides, "choices": rows,
            "ablation": json.loads(ABLATION.read_text()) if ABLATION.is_file() else [], "goals": []}


def _from_pipeline(pipeline: dict[str, Any] | None, overrides: dict) -> dict[str, Any] | None:
    """A row from the pipeline section's stage-by-stage run, if it ran on the sample with these overrides."""
    if not pipeline or "error" in pipeline or pipeline.get("overrides") != overrides or "sample" not in pipeline["data"]:
        return None
    stages = {r["stage"]: r for r in pipeline["stages"]}
    if any(s not in stages or stages[s]["returncode"] for s in (*TRAINING_STAGES, "evaluate")):
        return None
    training = [stages[s]["in_stage_seconds"] for s in TRAINING_STAGES]
    return {"backbone": pipeline["model"]["backbone"], "pooling": pipeline["model"]["pooling"],
            "test_map": pipeline["test_map"], "off_the_shelf_map": pipeline["off_the_shelf_map"],
            "training_seconds": round(sum(t or 0 for t in training), 1),
            **{f"{s}_seconds": t for s, t in zip(TRAINING_STAGES, training)},
            "wall_seconds": round(sum(r["wall_seconds"] for r in pipeline["stages"]), 1), "from": "pipeline section",
            "loadavg_start": pipeline["stages"][0]["loadavg_start"], "loadavg_end": pipeline["stages"][-1]["loadavg_end"]}
