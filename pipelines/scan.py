"""Stage `scan` (always run): list `ingest.source` with each file's content hash -> data/listing.parquet,
data/listing_report.json. Unchanged files give byte-identical outputs, so DVC reruns ingest exactly when a listed
image is added, removed or changed — for a folder, a CSV listing or an s3:// prefix alike."""

from __future__ import annotations

import logging

from components.data.listing import fingerprint, list_source
from components.storage import write_json, write_parquet
from pipelines._runner import run_stage
from pipelines.params import Params
from pipelines.paths import LISTING, LISTING_REPORT


log = logging.getLogger(__name__)


def run(params: Params) -> None:
    source = params.ingest.source
    listing = list_source(source)
    table = fingerprint(listing)
    write_parquet(LISTING, table)
    write_json(LISTING_REPORT, {"source": source, "files": len(table), **listing.report()})
    log.info("listed %d files in %d class folders from %s; skipped %d folder links or conflicting rows, "
             "%d empty class folders, %d repeated rows; listing: %s", len(table), table["label"].nunique(), source,
             len(listing.skipped), len(listing.empty_classes), len(listing.repeated_rows), LISTING)


if __name__ == "__main__":
    run_stage("scan", run)
