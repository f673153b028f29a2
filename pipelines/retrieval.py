"""Stage retrieval: from the best classifier, fine-tune with the double-margin contrastive loss (Ray Train job)."""

from __future__ import annotations

from components.training.context import BEST_MODEL_FILE
from components.training.loops import RetrievalJob, train_retrieval
from pipelines._runner import run_stage
from pipelines.common import (CLASSIFY_DIR, RETRIEVAL_DIR, labelled, load_splits, net_spec, optimisation,
                              retrieval_set, train_and_track, train_classes)
from pipelines.params import Params


def main(params: Params) -> None:
    splits = load_splits()
    p = params.retrieval
    job = RetrievalJob(
        net=net_spec(params.model, init_checkpoint=CLASSIFY_DIR / BEST_MODEL_FILE),
        optim=optimisation(p),
        train=labelled(splits[splits["role"] == "train"], train_classes(splits)),
        retrieval_val=retrieval_set(splits, "val"),
        pos_margin=p.pos_margin,
        neg_margin=p.neg_margin,
        pos_pairs_per_class=p.pos_pairs_per_class,
        neg_pairs_per_class=p.neg_pairs_per_class,
        redraw_every=p.redraw_every,
        eval_batch_size=params.index.batch_size,
    )
    train_and_track("retrieval", train_retrieval, job, params, RETRIEVAL_DIR, select="val_map")


if __name__ == "__main__":
    run_stage("retrieval", main)
