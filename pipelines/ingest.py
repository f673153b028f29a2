"""Stage `ingest`: the files `scan` listed (class folders in a folder or under an s3:// prefix, or a CSV listing) ->
data/manifest.parquet, data/ingest_report.json (with what the listing left out, under "listing")."""

from __future__ import annotations

import logging

from components.data.ingest import ingest
from components.data.listing import sources
from components.storage import read_json, read_parquet, write_json, write_parquet
from pipelines._runner import run_stage
from pipelines.params import Params
from pipelines.paths import INGEST_REPORT, LISTING, LISTING_REPORT, MANIFEST


log = logging.getLogger(__name__)


def run(params: Params) -> None:
    """Ingest `params.ingest.source` and write the manifest and the report."""
    p = params.ingest
    result = ingest(
        sources(read_parquet(LISTING)),
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
    listing = {k: read_json(LISTING_REPORT)[k] for k in ("skipped", "empty_classes", "repeated_rows")}
    write_json(INGEST_REPORT, {**result.report, "listing": listing})
    r = result.report
    log.info(
        "kept %d images in %d classes from %s; quarantined %d, duplicates dropped %d, leaks %d (%d files), "
        "excluded %d, over cap %d, not listed %d (folder links, conflicting rows), empty class folders %d; report: %s",
        r["images_kept"], r["classes"], r["source"], len(r["quarantine"]),
        sum(len(d["dropped"]) for d in r["duplicates"]), len(r["leaks"]),
        sum(len(leak["files"]) for leak in r["leaks"]), sum(r["excluded_classes"].values()),
        sum(len(c["left_out"]) for c in r["over_cap"].values()), len(listing["skipped"]),
        len(listing["empty_classes"]), INGEST_REPORT,
    )


if __name__ == "__main__":
    run_stage("ingest", run)
