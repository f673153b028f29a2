"""The stages' file contract: every path a stage reads or writes, relative to the repo root (where dvc runs the
stages), defined once. dvc.yaml declares the same paths as each stage's deps and outs."""

from pathlib import Path

LISTING = Path("data/listing.parquet")
LISTING_REPORT = Path("data/listing_report.json")
MANIFEST = Path("data/manifest.parquet")
INGEST_REPORT = Path("data/ingest_report.json")
SPLITS = Path("data/splits.parquet")
SPLIT_REPORT = Path("data/split_report.json")
CLASSIFY_DIR = Path("models/classify")
RETRIEVAL_DIR = Path("models/retrieval")
BEST_MARGINS = Path("tune/best_margins.json")  # the tune stage's choice of (m+, m−), read by retrieval
TRIALS_TABLE = Path("tune/trials.csv")
MARGIN_PLOT = Path("plots/margins.png")
INDEX_DIR = Path("index")
METRICS_DIR = Path("metrics")  # metrics/<stage>.json
METRICS_FILE = Path("metrics.json")  # evaluate's test metrics
PLOTS_DIR = Path("plots")
