"""Stage retrieval: metric-learning fine-tune (default: double-margin contrastive from the best classifier), a Ray
Train job; optional PCA-whitening learned on the train classes afterwards."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from components.training.context import BEST_MODEL_FILE
from components.training.loops import RetrievalJob, train_retrieval
from pipelines._runner import run_stage
from pipelines.common import (CLASSIFY_DIR, RETRIEVAL_DIR, fit_whitening, labelled, load_splits, net_spec,
                              optimisation, retrieval_set, train_and_track, train_classes)
from pipelines.params import Params, RetrievalParams


def retrieval_job(params: Params, p: RetrievalParams, splits: pd.DataFrame) -> RetrievalJob:
    return RetrievalJob(
        net=net_spec(params.model, init_checkpoint=CLASSIFY_DIR / BEST_MODEL_FILE if p.init == "classifier" else None),
        optim=optimisation(p),
        train=labelled(splits[splits["role"] == "train"], train_classes(splits)),
        retrieval_val=retrieval_set(splits, "val"),
        pos_margin=p.pos_margin,
        neg_margin=p.neg_margin,
        pos_pairs_per_class=p.pos_pairs_per_class,
        neg_pairs_per_class=p.neg_pairs_per_class,
        redraw_every=p.redraw_every,
        eval_batch_size=params.index.batch_size,
        loss=p.loss,
        squared_hinge=p.squared_hinge,
        mining=p.mining,
        mining_pool_size=p.mining_pool_size,
        triplet_margin=p.triplet_margin,
        classes_per_batch=p.classes_per_batch,
        images_per_class=p.images_per_class,
    )


def whitening_step(params: Params, p: RetrievalParams, splits: pd.DataFrame):
    """The post-training step that learns whitening on the train classes, or None when it is off."""
    if not p.whitening.enabled:
        return None
    uris = splits.loc[splits["role"] == "train", "uri"].tolist()

    def whiten(model_dir: Path) -> None:
        fit_whitening(model_dir / BEST_MODEL_FILE, uris, p.whitening.dim, params.model.image_size, params.index.batch_size)

    return whiten


def main(params: Params) -> None:
    splits = load_splits()
    p = params.retrieval
    train_and_track("retrieval", train_retrieval, retrieval_job(params, p, splits), params, RETRIEVAL_DIR,
                    select="val_map", after_training=whitening_step(params, p, splits))


if __name__ == "__main__":
    run_stage("retrieval", main)
