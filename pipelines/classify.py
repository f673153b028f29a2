"""Stage classify: fine-tune the ImageNet backbone as a classifier of the train classes (Ray Train job)."""

from __future__ import annotations

from components.training.classify import train_classifier
from components.training.jobs import ClassifyJob
from pipelines._runner import run_stage
from pipelines.common import labelled, load_splits, net_spec, optimisation, train_and_track, val_set
from pipelines.params import Params
from pipelines.paths import CLASSIFY_DIR


def main(params: Params) -> None:
    splits = load_splits()
    classes = splits.train_classes()
    job = ClassifyJob(
        net=net_spec(params.model),
        optim=optimisation(params.classify),
        classes=classes,
        train=labelled(splits.classifier_train(), classes),
        val=labelled(splits.classifier_val(), classes),
        retrieval_val=val_set(splits),
        eval_batch_size=params.index.batch_size,
    )
    train_and_track("classify", train_classifier, job, params, CLASSIFY_DIR, select="val_accuracy")


if __name__ == "__main__":
    run_stage("classify", main)
