"""Stage retrieval: metric-learning fine-tune (default: double-margin contrastive from the best classifier), a Ray
Train job; optional PCA-whitening learned on the train classes afterwards."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from components.errors import FiresightError
from components.training.context import BEST_MODEL_FILE
from components.training.loops import RetrievalJob, train_retrieval
from pipelines._runner import run_stage
from pipelines.common import (BEST_MARGINS, CLASSIFY_DIR, RETRIEVAL_DIR, fit_whitening, labelled, load_splits, net_spec,
                              optimisation, retrieval_set, train_and_track, train_classes)
from pipelines.params import Params, RetrievalParams


def retrieval_job(params: Params, p: RetrievalParams, splits: pd.DataFrame,
                  margins: tuple[float, float] | None = None) -> RetrievalJob:
    """The retrieval fine-tune from params; `margins` (m+, m−) override the params' ones."""
    pos_margin, neg_margin = margins or (p.pos_margin, p.neg_margin)
    return RetrievalJob(
        net=net_spec(params.model, init_checkpoint=CLASSIFY_DIR / BEST_MODEL_FILE if p.init == "classifier" else None),
        optim=optimisation(p),
        train=labelled(splits[splits["role"] == "train"], train_classes(splits)),
        retrieval_val=retrieval_set(splits, "val"),
        pos_margin=pos_margin,
        neg_margin=neg_margin,
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


def chosen_margins() -> tuple[float, float]:
    """(m+, m−) as the tune stage chose them (searched, or the params' when the search is off)."""
    try:
        chosen = json.loads(BEST_MARGINS.read_text())
        pos, neg = float(chosen["pos_margin"]), float(chosen["neg_margin"])
    except FileNotFoundError:
        raise FiresightError(f"{BEST_MARGINS}: not found; run the tune stage first (dvc repro tune)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise FiresightError(f"{BEST_MARGINS}: not a margins file ({type(e).__name__}: {e})") from None
    if not 0 <= pos < neg:
        raise FiresightError(f"{BEST_MARGINS}: needs 0 <= pos_margin < neg_margin, got {pos} and {neg}")
    return pos, neg


def main(params: Params) -> None:
    splits = load_splits()
    p = params.retrieval
    margins = chosen_margins()
    logging.getLogger(__name__).info("margins m+=%g m-=%g from %s", *margins, BEST_MARGINS)
    train_and_track("retrieval", train_retrieval, retrieval_job(params, p, splits, margins), params, RETRIEVAL_DIR,
                    select="val_map", after_training=whitening_step(params, p, splits),
                    extra_params={"margins_used": {"pos": margins[0], "neg": margins[1], "from": str(BEST_MARGINS)}})


if __name__ == "__main__":
    run_stage("retrieval", main)
