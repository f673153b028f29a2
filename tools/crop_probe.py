"""Object crops measured without training: for the off-the-shelf network and the split's classifier (and the
retrieval model when it exists), val leave-one-out mAP with and without each crop threshold (what the postprocess
stage chooses on), and test leave-one-out mAP with its 95% class-bootstrap CI and the paired CI of each crop's
difference from no crop, at one scale, no whitening, no reranking.

    .venv/bin/python tools/crop_probe.py [--threshold 0.2 ...] [--output crop_probe.json]   # after dvc repro classify
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from components.data.contract import LABEL, URI
from components.evaluation.protocol import leave_one_out_map
from components.models.localise import ObjectCrop
from components.models.net import load_net
from components.search.embed import embed_images
from components.search.postprocess import Reranking
from components.training.context import BEST_MODEL_FILE
from pipelines.common import load_splits, off_the_shelf, test_scores
from pipelines.params import DEFAULT_PARAMS, load_params
from pipelines.paths import CLASSIFY_DIR, RETRIEVAL_DIR


def main(threshold: list[float] = typer.Option([0.1, 0.2, 0.3, 0.5], help="crop thresholds tried (repeatable)"),
         margin: float = typer.Option(0.1, help="the box's growth on each side"),
         output: Path = typer.Option(Path("crop_probe.json"), help="where the figures go")) -> None:
    params, splits = load_params(DEFAULT_PARAMS), load_splits()
    boot = (params.evaluate.bootstrap.resamples, params.evaluate.bootstrap.confidence, params.evaluate.bootstrap.seed)
    nets = {"off-the-shelf": lambda: off_the_shelf(params, splits),
            "cls": lambda: load_net(CLASSIFY_DIR / BEST_MODEL_FILE)}
    if (RETRIEVAL_DIR / BEST_MODEL_FILE).is_file():
        nets["cls + retrieval"] = lambda: load_net(RETRIEVAL_DIR / BEST_MODEL_FILE)
    val, queries, database = splits.val_set(), splits.test_queries(), splits.test_database()
    rows: dict[str, dict] = {}
    for name, make in nets.items():
        net, scores = make(), {}
        for crop in [None, *(ObjectCrop(t, margin) for t in threshold)]:
            start, key = time.perf_counter(), "none" if crop is None else f"threshold {crop.threshold:g}"
            embed = lambda uris, c=crop: embed_images(net, uris, batch_size=params.index.batch_size, object_crop=c,  # noqa: E731
                                                      progress=True, desc=f"{name}, {key}")[1]
            val_map = leave_one_out_map(embed(val[URI].tolist()), val[LABEL].to_numpy(), Reranking())
            scores[key] = test_scores(net, splits, params,
                                      descriptors=(embed(queries[URI].tolist()), embed(database[URI].tolist())))
            row = {"val_loo_map": round(val_map, 4), "test_loo_map": scores[key].summary(*boot)["leave_one_out"]["map"]}
            if crop is not None:
                row["gain_vs_none"] = scores[key].gain_over(scores["none"], *boot)["leave_one_out"]["map"]
            rows[f"{name}, {key}"] = {**row, "seconds": round(time.perf_counter() - start, 1)}
            typer.echo(f"{name}, {key}: {json.dumps(rows[f'{name}, {key}'])}")
    output.write_text(json.dumps({"test_images": len(queries) + len(database), "margin": margin, "rows": rows},
                                 indent=1) + "\n")


if __name__ == "__main__":
    typer.run(main)
