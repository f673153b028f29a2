"""Stage `ingest`: raw images (class folders in a folder or under an s3:// prefix, or a CSV listing) ->
data/manifest.parquet, data/ingest_report.json."""

from __future__ import annotations

import logging
from pathlib import Path

from components.data.ingest import ingest
from components.data.listing import SourceFile, list_class_folder, read_listing_csv
from components.errors import FiresightError
from components.storage import is_remote, write_json, write_parquet
from pipelines._runner import run_stage
from pipelines.params import Params

MANIFEST = Path("data/manifest.parquet")
REPORT = Path("data/ingest_report.json")

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    """Ingest `params.ingest.source` and write the manifest and the report."""
    p = params.ingest
    result = ingest(
        _list_source(p.source),
        source=p.source,
        exclude_classes=p.exclude_classes,
        max_images_per_class=p.max_images_per_class,
        min_side=p.min_side,
        workers=p.workers,
        seed=p.seed,
        max_file_bytes=p.max_file_bytes,
        max_pixels=p.max_pixels,
    )
    write_parquet(MANIFEST, result.manifest)
    write_json(REPORT, result.report)
    r = result.report
    log.info(
        "kept %d images in %d classes from %s; quarantined %d, duplicates dropped %d, leaks %d (%d files), "
        "excluded %d, over cap %d; report: %s",
        r["images_kept"], r["classes"], r["source"], len(r["quarantine"]),
        sum(len(d["dropped"]) for d in r["duplicates"]), len(r["leaks"]),
        sum(len(leak["files"]) for leak in r["leaks"]), sum(r["excluded_classes"].values()),
        sum(len(c["left_out"]) for c in r["over_cap"].values()), REPORT,
    )


def _list_source(uri: str) -> list[SourceFile]:
    if is_remote(uri):
        return list_class_folder(uri)
    source = Path(uri)
    if source.is_dir():
        return list_class_folder(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return read_listing_csv(source)
    if not source.exists():
        raise FiresightError(f"ingest.source: {source} does not exist")
    raise FiresightError(f"ingest.source: {source} is neither a folder of class folders nor a .csv listing")


if __name__ == "__main__":
    run_stage("ingest", run)
