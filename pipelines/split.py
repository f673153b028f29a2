"""Stage `split`: data/manifest.parquet -> class-disjoint data/splits.parquet, data/split_report.json."""

from __future__ import annotations

import logging

from components.data.splits import split_classes
from components.errors import FiresightError
from components.storage import read_parquet, write_json, write_parquet
from pipelines._runner import run_stage
from pipelines.params import Params
from pipelines.paths import MANIFEST, SPLIT_REPORT, SPLITS


log = logging.getLogger(__name__)


def run(params: Params) -> None:
    """Split the manifest's classes and images and write the splits and the report."""
    if not MANIFEST.exists():
        raise FiresightError(f"{MANIFEST}: no such file (run the ingest stage first)")
    p = params.split
    ratio = p.class_ratio
    result = split_classes(
        read_parquet(MANIFEST),
        seed=p.seed,
        class_ratio=(ratio.train, ratio.val, ratio.test),
        val_classes=p.val_classes,
        test_classes=p.test_classes,
        queries_per_class=p.queries_per_class,
        classifier_train_fraction=p.classifier_train_fraction,
        min_images_per_class=p.min_images_per_class,
    )
    write_parquet(SPLITS, result.splits)
    write_json(SPLIT_REPORT, result.report)
    counts = result.report["class_counts"]
    log.info(
        "classes train/val/test = %d/%d/%d (%d excluded), %d images; report: %s",
        counts["train"], counts["val"], counts["test"], len(result.report["excluded"]), len(result.splits), SPLIT_REPORT,
    )


if __name__ == "__main__":
    run_stage("split", run)
