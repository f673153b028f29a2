"""Stage retrieval: metric-learning fine-tune (default: double-margin contrastive from the best classifier), a Ray
Train job; optional PCA-whitening learned on the train classes afterwards."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from components.data.contract import URI, Splits
from components.errors import FiresightError
from components.losses.contrastive import check_margins, with_margins
from components.training.context import BEST_MODEL_FILE
from components.training.jobs import RetrievalJob
from components.training.retrieval import train_retrieval
from pipelines._runner import run_stage
from pipelines.common import fit_whitening, labelled, load_splits, net_spec, optimisation, train_and_track, val_set
from pipelines.params import Params, RetrievalParams
from pipelines.paths import BEST_MARGINS, CLASSIFY_DIR, RETRIEVAL_DIR


def retrieval_job(params: Params, p: RetrievalParams, splits: Splits,
                  margins: tuple[float, float] | None = None) -> RetrievalJob:
    """The retrieval fine-tune from params; `margins` (m+, m−) replace the double-margin criterion's own."""
    return RetrievalJob(
        net=net_spec(params.model, init_checkpoint=CLASSIFY_DIR / BEST_MODEL_FILE if p.init == "classifier" else None),
        optim=optimisation(p),
        train=labelled(splits.train_images(), splits.train_classes()),
        retrieval_val=val_set(splits),
        criterion=with_margins(p.criterion.spec(), *margins) if margins else p.criterion.spec(),
        sampler=p.sampler.spec(),
        miner=p.miner.spec() if p.miner else None,
        eval_batch_size=params.index.batch_size,
    )


def whitening_step(params: Params, p: RetrievalParams, splits: Splits):
    """The post-training step that learns whitening on the train classes, or None when it is off."""
    if not p.whitening.enabled:
        return None
    uris = splits.train_images()[URI].tolist()

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
    try:
        check_margins(pos, neg)
    except ValueError as e:
        raise FiresightError(f"{BEST_MARGINS}: {e}") from None
    return pos, neg


def main(params: Params) -> None:
    splits = load_splits()
    p = params.retrieval
    margins = None
    if p.criterion.name == "double_margin_contrastive":  # the margins the tune stage chose
        margins = chosen_margins()
        logging.getLogger(__name__).info("margins m+=%g m-=%g from %s", *margins, BEST_MARGINS)
    train_and_track("retrieval", train_retrieval, retrieval_job(params, p, splits, margins), params, RETRIEVAL_DIR,
                    select="val_map", after_training=whitening_step(params, p, splits),
                    extra_params={"margins_used": {"pos": margins[0], "neg": margins[1], "from": str(BEST_MARGINS)}}
                    if margins else None)


if __name__ == "__main__":
    run_stage("retrieval", main)
