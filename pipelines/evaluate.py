"""Stage evaluate: test queries against the index (mAP, CMC), next to the off-the-shelf ImageNet backbone;
distance histograms; register the model in MLflow and move the champion alias only if it beats the holder."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from components import tracking
from components.data.images import load_rgb
from components.errors import FiresightError
from components.evaluation.metrics import distance_summary, pair_distances
from components.evaluation.protocol import score_queries
from components.evaluation.plots import plot_distance_histograms
from components.models.net import load_net
from components.search.embed import embed_images
from components.storage import read_parquet, write_json
from components.training.context import BEST_MODEL_FILE
from pipelines._runner import run_stage
from pipelines.common import git_commit, load_splits, manifest_digest, net_spec, params_dict, stopwatch, test_scores
from pipelines.params import Params
from pipelines.paths import INDEX_DIR, MANIFEST, METRICS_FILE, PLOTS_DIR, RETRIEVAL_DIR

log = logging.getLogger(__name__)
EXAMPLE_SIDE = 64  # the registered model's input example: one test image shrunk to this longer side


def main(params: Params) -> None:
    tracking.configure(params.tracking.uri, params.tracking.experiment)  # a tracking server that is down fails here
    with stopwatch() as timing:
        splits = load_splits()
        queries = splits.test_queries()
        ids = read_parquet(INDEX_DIR / "ids.parquet")
        db_desc = np.load(INDEX_DIR / "descriptors.npy")
        size, bs, ranks = params.model.image_size, params.index.batch_size, params.evaluate.cmc_ranks

        net = load_net(RETRIEVAL_DIR / BEST_MODEL_FILE)
        _, q_desc = embed_images(net, queries["uri"].tolist(), batch_size=bs, image_size=size, progress=True, desc="queries")
        # mAP needs the whole database ranked: exact search over the index's descriptors, whatever index.kind serves
        finetuned, q_desc = score_queries(q_desc, queries["label"], db_desc, ids["label"], ranks=ranks,
                                          qe_k=params.evaluate.qe_k, qe_alpha=params.evaluate.qe_alpha)

        if not ids["id"].equals(splits.test_database()["id"]):
            raise FiresightError(f"{INDEX_DIR}: its ids are not the split's test database; run the index stage again")
        # the same architecture, never trained here
        baseline, base_q, base_db = test_scores(net_spec(params.model).build().eval(), splits, params, desc="off-the-shelf")

        distances = {
            "fine-tuned": pair_distances(q_desc, queries["label"], db_desc, ids["label"]),
            "off-the-shelf": pair_distances(base_q, queries["label"], base_db, ids["label"]),
        }
        plot_distance_histograms(distances, PLOTS_DIR / "distances.png",
                                 title="Test query–database distances: same class vs different class")
    metrics = {
        "test": finetuned,
        "off_the_shelf": baseline,
        "gain": {k: round(finetuned[k] - baseline[k], 6) for k in finetuned if k == "map" or k.startswith("cmc@")},
        "distances": {name: distance_summary(*pair) for name, pair in distances.items()},
        **timing,
    }
    write_json(METRICS_FILE, metrics)
    log.info("test mAP %.4f (off-the-shelf %.4f), CMC@1 %.4f (off-the-shelf %.4f)",
             finetuned["map"], baseline["map"], finetuned["cmc@1"], baseline["cmc@1"])
    _register(params, metrics, queries, net.meta)


def _register(params: Params, metrics: dict, queries: pd.DataFrame, meta: dict) -> None:
    example = load_rgb(queries["uri"].iloc[0])
    example.thumbnail((EXAMPLE_SIDE, EXAMPLE_SIDE))
    tags = {
        "git_commit": git_commit(),
        "data_manifest_sha256": manifest_digest(read_parquet(MANIFEST)),
        "backbone": meta["arch"],
        "pooling": meta["pooling"],
        "criterion": json.dumps(meta.get("criterion"), sort_keys=True),
        "sampler": json.dumps(meta.get("sampler"), sort_keys=True),
    }
    with tracking.stage_run("evaluate", params_dict(params, "model", "evaluate"), tags):
        tracking.mlflow.log_metrics({f"test_{k.replace('@', '_at_')}": float(v) for k, v in metrics["test"].items()})
        tracking.mlflow.log_metrics({f"off_the_shelf_{k.replace('@', '_at_')}": float(v) for k, v in metrics["off_the_shelf"].items()})
        tracking.mlflow.log_artifact(str(PLOTS_DIR / "distances.png"), "plots")
        tracking.register_model(
            checkpoint=RETRIEVAL_DIR / BEST_MODEL_FILE,
            example_image=np.asarray(example),
            name=params.evaluate.registered_model,
            alias=params.evaluate.champion_alias,
            metric="test_map",
            value=metrics["test"]["map"],
            tags=tags,
        )


if __name__ == "__main__":
    run_stage("evaluate", main)
