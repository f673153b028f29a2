"""Stage retrieval: metric-learning fine-tune (default: double-margin contrastive from the best classifier), a Ray
Train job (whitening and the other training-free choices are the postprocess stage's)."""

from __future__ import annotations

import json
import logging
from typing import Any

from components.data.contract import Splits
from components.errors import FiresightError
from components.models.spec import NetSpec
from components.training.context import BEST_MODEL_FILE
from components.training.jobs import RetrievalJob
from components.training.retrieval import train_retrieval
from pipelines._runner import run_stage
from pipelines.common import labelled, load_splits, net_spec, optimisation, train_and_track, val_set
from pipelines.params import Params, ParamsError, RetrievalParams, unflatten, with_overrides
from pipelines.paths import BEST_PARAMS, CLASSIFY_DIR, RETRIEVAL_DIR


def starting_nets(params: Params) -> dict[str, NetSpec]:
    """The network retrieval starts from for each `retrieval.init`, its files resolved here, in the stage (a search's
    trials run in folders of their own)."""
    return {"classifier": net_spec(params.model, init_checkpoint=CLASSIFY_DIR / BEST_MODEL_FILE),
            "imagenet": net_spec(params.model)}


def retrieval_job(params: Params, p: RetrievalParams, splits: Splits, nets: dict[str, NetSpec]) -> RetrievalJob:
    """The retrieval fine-tune of retrieval params `p` (params.retrieval, or with a search's values) from
    `nets[p.init]` (`starting_nets`)."""
    return RetrievalJob(
        net=nets[p.init],
        optim=optimisation(p),
        train=labelled(splits.train_images(), splits.train_classes()),
        retrieval_val=val_set(splits),
        criterion=p.criterion.spec(),
        sampler=p.sampler.spec(),
        miner=p.miner.spec() if p.miner else None,
        eval_batch_size=params.index.batch_size,
        cache_frozen_trunk=p.cache_frozen_trunk,
    )


def chosen_overrides() -> dict[str, Any]:
    """The retrieval params the tune stage chose ({path: value}; none when the search is off)."""
    try:
        overrides = json.loads(BEST_PARAMS.read_text())["overrides"]
    except FileNotFoundError:
        raise FiresightError(f"{BEST_PARAMS}: not found; run the tune stage first (dvc repro tune)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise FiresightError(f"{BEST_PARAMS}: not a tune choice ({type(e).__name__}: {e})") from None
    if not isinstance(overrides, dict) or not all(str(k).startswith("retrieval.") for k in overrides):
        raise FiresightError(f"{BEST_PARAMS}: overrides must map retrieval.* paths to values, got {overrides!r}")
    return overrides


def main(params: Params) -> None:
    splits = load_splits()
    overrides = chosen_overrides()
    try:
        p = with_overrides(params.retrieval, unflatten(overrides).get("retrieval", {}))
    except ParamsError as e:
        raise FiresightError(f"{BEST_PARAMS}: {e}") from None
    if overrides:
        logging.getLogger(__name__).info("tuned %s from %s", ", ".join(f"{k}={v}" for k, v in overrides.items()), BEST_PARAMS)
    train_and_track("retrieval", train_retrieval, retrieval_job(params, p, splits, starting_nets(params)), params,
                    RETRIEVAL_DIR, select="val_map",
                    extra_params={"tuned": {**overrides, "from": str(BEST_PARAMS)}} if overrides else None)


if __name__ == "__main__":
    run_stage("retrieval", main)
