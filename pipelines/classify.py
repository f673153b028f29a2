"""Stage classify: fine-tune the ImageNet backbone as a classifier of the train classes (Ray Train job)."""

from __future__ import annotations

from components.training.loops import ClassifyJob, train_classifier
from pipelines._runner import run_stage
from pipelines.common import (CLASSIFY_DIR, labelled, load_splits, net_spec, optimisation, retrieval_set,
                              train_and_track, train_classes)
from pipelines.params import Params


def main(params: Params) -> None:
    splits = load_splits()
    classes = train_classes(splits)
    job = ClassifyJob(
        net=net_spec(params.model),
        optim=optimisation(params.classify),
        classes=classes,
        train=labelled(splits[splits["split"] == "cls_train"], classes),
        val=labelled(splits[splits["split"] == "cls_val"], classes),
        retrieval_val=retrieval_set(splits, "val"),
        eval_batch_size=params.index.batch_size,
    )
    train_and_track("classify", train_classifier, job, params, CLASSIFY_DIR, select="val_accuracy")


if __name__ == "__main__":
    run_stage("classify", main)
