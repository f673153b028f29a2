"""Images, ingest, the data contract, splits, datasets, pair draws and batch transforms."""
