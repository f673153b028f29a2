"""Stage evaluate: four systems on the test classes, touched once — off-the-shelf ImageNet, off-the-shelf with its
training-free choices (the best training-free baseline), fine-tuned, and fine-tuned with its choices (the full
pipeline: the index and the search model). Both protocols (Firearm queries, leave-one-out), 95% class-bootstrap CIs,
paired CIs of the gains; distance histograms; an HTML gallery of the test queries' top results; register the search
model in MLflow and move the champion alias only if its leave-one-out test mAP beats the holder's."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from components import tracking
from components.catalog.describe import DIGEST_KEY, model_digest
from components.catalog.store import SearchIndex
from components.data.contract import ID, LABEL, URI
from components.data.images import load_rgb
from components.errors import FiresightError
from components.evaluation.bootstrap import format_gain
from components.evaluation.gallery import top_results, write_gallery
from components.evaluation.metrics import distance_summary, pair_distances
from components.evaluation.plots import plot_distance_histograms
from components.models.localise import object_boxes, object_crop_of
from components.models.net import load_net
from components.search.postprocess import reranking_of
from components.storage import read_parquet, write_json
from components.training.context import BEST_MODEL_FILE
from pipelines._runner import run_stage
from pipelines.common import git_commit, load_splits, manifest_digest, off_the_shelf, params_dict, stopwatch
from pipelines.embedding import embed_all, embed_test, test_scores
from pipelines.params import Params
from pipelines.paths import (GALLERY, INDEX_DIR, MANIFEST, METRICS_FILE, OFF_THE_SHELF_DIR, PLOTS_DIR, RETRIEVAL_DIR,
                             SEARCH_DIR)

log = logging.getLogger(__name__)
EXAMPLE_SIDE = 64  # the registered model's input example: one test image shrunk to this longer side
FULL = "full pipeline"
GAINS = {  # name: (system, compared with)
    "over the best training-free": (FULL, "off-the-shelf + free wins"),
    "over off-the-shelf": (FULL, "off-the-shelf"),
    "fine-tuning alone": ("fine-tuned", "off-the-shelf"),
    "free wins on the fine-tuned": (FULL, "fine-tuned"),
}
GALLERY_SYSTEMS = (FULL, "off-the-shelf")  # the gallery's rows per query: the search model next to where it began
GALLERY_BOX_BATCH = 32  # images per localisation pass for the gallery's object boxes


def main(params: Params) -> None:
    tracking.configure(params.tracking.uri, params.tracking.experiment)  # a tracking server that is down fails here
    splits = load_splits()
    queries, db = splits.test_queries(), splits.test_database()
    index = SearchIndex.open(INDEX_DIR)
    if not index.entries[ID].equals(db[ID].reset_index(drop=True)):
        raise FiresightError(f"{INDEX_DIR}: its images are not the split's test database; run the index stage again")
    e = params.evaluate
    boot = (e.bootstrap.resamples, e.bootstrap.confidence, e.bootstrap.seed)

    with stopwatch() as timing:
        search_net = load_net(SEARCH_DIR / BEST_MODEL_FILE)
        index.check_model({DIGEST_KEY: model_digest(search_net)})
        query_desc = embed_all(search_net, queries[URI].tolist(), params, f"{FULL}: test queries")
        descriptors = {FULL: (query_desc, index.descriptors)}  # the database as indexed
        nets = {"off-the-shelf": off_the_shelf(params, splits),  # the same architecture, never trained here
                "off-the-shelf + free wins": load_net(OFF_THE_SHELF_DIR / BEST_MODEL_FILE),
                "fine-tuned": load_net(RETRIEVAL_DIR / BEST_MODEL_FILE)}
        descriptors.update({name: embed_test(net, splits, params, name) for name, net in nets.items()})
        nets[FULL] = search_net
        scores = {name: test_scores(nets[name], splits, params, descriptors=pair) for name, pair in descriptors.items()}
        summaries = {name: s.summary(*boot) for name, s in scores.items()}
        gains = {name: scores[a].gain_over(scores[b], *boot) for name, (a, b) in GAINS.items()}
        distances = {name: pair_distances(descriptors[name][0], queries[LABEL], descriptors[name][1], db[LABEL])
                     for name in ("off-the-shelf", "fine-tuned")}
        plot_distance_histograms(distances, PLOTS_DIR / "distances.png",
                                 title="Test query–database distances: same class vs different class")
    metrics = {
        "test": summaries[FULL],
        "baselines": {name: s for name, s in summaries.items() if name != FULL},
        "gains": gains,
        "recipes": {name: _recipe(net.meta) for name, net in nets.items()},
        "distances": {name: distance_summary(*pair) for name, pair in distances.items()},
        **timing,
    }
    write_json(METRICS_FILE, metrics)
    log.info("gallery: %d queries → %s", _gallery(queries, db, descriptors, nets), GALLERY)
    loo = summaries[FULL]["leave_one_out"]  # the stage's summary line (the last)
    log.info("test leave-one-out mAP %.4f [%.4f, %.4f]; gain over the best training-free %s, over off-the-shelf %s",
             loo["map"]["value"], loo["map"]["lo"], loo["map"]["hi"],
             format_gain(gains["over the best training-free"]["leave_one_out"]["map"]),
             format_gain(gains["over off-the-shelf"]["leave_one_out"]["map"]))
    _register(params, metrics, queries, search_net.meta, index.model[DIGEST_KEY])


def _gallery(queries: pd.DataFrame, db: pd.DataFrame, descriptors: dict[str, tuple[np.ndarray, np.ndarray]],
             nets: dict) -> int:
    """Write the HTML gallery of the Firearm protocol's test queries (each system ranked as its scores were), worst
    first; return how many queries it shows."""
    systems = {name: top_results(*descriptors[name], queries[LABEL], db[LABEL], reranking_of(nets[name].meta))
               for name in GALLERY_SYSTEMS}
    q_uris, d_uris = queries[URI].tolist(), db[URI].tolist()
    shown = list(dict.fromkeys(q_uris + [d_uris[j] for s in systems.values() for j in s.top.ravel()]))
    crops = {n: object_crop_of(nets[n].meta) for n in GALLERY_SYSTEMS}
    cropping = next((n for n, crop in crops.items() if crop), None)
    boxes = {}
    for start in range(0, len(shown) if cropping else 0, GALLERY_BOX_BATCH):  # the first cropping system's boxes
        uris = shown[start:start + GALLERY_BOX_BATCH]
        boxes.update(zip(uris, object_boxes(nets[cropping], [load_rgb(u) for u in uris], crops[cropping]), strict=True))
    return write_gallery(GALLERY, q_uris, queries[LABEL].tolist(), d_uris, db[LABEL].tolist(), systems,
                         title="Firesight test gallery: " + " vs ".join(GALLERY_SYSTEMS), boxes=boxes,
                         boxes_of=cropping or "")


def _recipe(meta: dict) -> str:
    crop = object_crop_of(meta)
    return (f"{meta['image_size']} px, scales {meta.get('scales', [1.0])}{f', {crop.describe()}' if crop else ''}, "
            f"whitening {meta.get('whitening', 'none')}, reranking {reranking_of(meta).describe()}")


def _flat(summary: dict) -> dict[str, float]:
    """MLflow metric names of a summary: <protocol>_<figure> and its _lo/_hi."""
    out = {}
    for protocol, figures in summary.items():
        for figure, v in figures.items():
            if isinstance(v, dict):
                key = f"{protocol}_{figure.replace('@', '_at_')}"
                out.update({key: v["value"], f"{key}_lo": v["lo"], f"{key}_hi": v["hi"]})
    return out


def _register(params: Params, metrics: dict, queries: pd.DataFrame, meta: dict, digest: str) -> None:
    example = load_rgb(queries[URI].iloc[0])
    example.thumbnail((EXAMPLE_SIDE, EXAMPLE_SIDE))
    tags = {
        "git_commit": git_commit(),
        "data_manifest_sha256": manifest_digest(read_parquet(MANIFEST)),
        "backbone": meta["arch"],
        "pooling": meta["pooling"],
        "criterion": json.dumps(meta.get("criterion"), sort_keys=True),
        "sampler": json.dumps(meta.get("sampler"), sort_keys=True),
        "search_recipe": metrics["recipes"][FULL],
        DIGEST_KEY: digest,  # what `firesight` matches an index's model with
    }
    with tracking.stage_run("evaluate", params_dict(params, "model", "evaluate"), tags):
        tracking.mlflow.log_metrics({f"test_{k}": v for k, v in _flat(metrics["test"]).items()})
        for name, summary in metrics["baselines"].items():
            tracking.mlflow.log_metrics({f"{name.replace(' + ', '_').replace(' ', '_').replace('-', '_')}_{k}": v
                                         for k, v in _flat(summary).items()})
        for name, gain in metrics["gains"].items():
            tracking.mlflow.log_metrics({f"gain_{name.replace(' ', '_').replace('-', '_')}_{p}_map": g["map"]["diff"]
                                         for p, g in gain.items()})
        tracking.mlflow.log_artifact(str(PLOTS_DIR / "distances.png"), "plots")
        tracking.mlflow.log_artifact(str(GALLERY), "reports")
        tracking.register_model(
            checkpoint=SEARCH_DIR / BEST_MODEL_FILE,
            example_image=np.asarray(example),
            name=params.evaluate.registered_model,
            alias=params.evaluate.champion_alias,
            metric="test_loo_map",
            value=metrics["test"]["leave_one_out"]["map"]["value"],
            tags=tags,
        )


if __name__ == "__main__":
    run_stage("evaluate", main)
