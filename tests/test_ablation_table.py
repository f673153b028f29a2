from pipelines.ablation import ROWS, markdown_table
from pipelines.params import load_params, with_overrides


def test_rows_cover_the_papers_table():
    assert [r.name for r in ROWS] == ["off-the-shelf", "retr-s", "retr-d", "cls", "cls + retr-d", "cls + triplet",
                                      "cls + retr-d + whitening + αQE"]
    retrieval = load_params("params.yaml").retrieval
    rows = {r.name: with_overrides(retrieval, r.train) for r in ROWS if r.train is not None}
    assert rows["retr-s"].criterion.args.pos_margin == 0.0  # single vs double margin
    assert rows["retr-d"].criterion == retrieval.criterion and rows["retr-d"].init == "imagenet"
    assert rows["cls + triplet"].criterion.name == "batch_hard_triplet" and rows["cls + triplet"].sampler.name == "class_balanced"


def test_markdown_table_reports_relative_change():
    params = load_params("params.yaml")
    rows = [{"row": "off-the-shelf", "map": 0.5, "cmc@1": 0.6, "cmc@5": 0.8, "cmc@10": 0.9, "queries": 4, "database": 20, "wall_seconds": 3},
            {"row": "cls + retr-d", "map": 0.6, "cmc@1": 0.7, "cmc@5": 0.8, "cmc@10": 0.9, "queries": 4, "database": 20,
             "best_epoch": 2, "val_map_start": 0.55, "val_map_last": 0.61, "val_map_best": 0.62, "wall_seconds": 4}]
    table = markdown_table(rows, params, qe_k=5, qe_alpha=3.0)
    assert "| cls + retr-d | 0.6000 | 0.700 | 0.800 | 0.900 | +20.0% | 0.550 → 0.610 (2) | 4 |" in table
    assert "| off-the-shelf | 0.5000 |" in table and "4 queries against 20 database images" in table
