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
SEARCH_DIR = Path("models/search")  # the fine-tuned network with its training-free choices: what is searched with
OFF_THE_SHELF_DIR = Path("models/off_the_shelf")  # the ImageNet network with its own choices: the best free baseline
POSTPROCESS_CHOICE = Path("choice.json")  # in each of the two: every candidate tried on val
BEST_PARAMS = Path("tune/best_params.json")  # the tune stage's choice of the searched retrieval params
TRIALS_TABLE = Path("tune/trials.csv")
SEARCH_PLOT = Path("plots/search.png")
INDEX_DIR = Path("index")
METRICS_DIR = Path("metrics")  # metrics/<stage>.json
METRICS_FILE = Path("metrics.json")  # evaluate's test metrics
PLOTS_DIR = Path("plots")
GALLERY = Path("reports/gallery.html")  # evaluate's look at the test queries' top results
