"""Class-disjoint splits: disjointness, determinism, protocol counts, exclusions, impossible splits, the stages."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.data.contract import SPLIT_COLUMNS, check_splits
from components.data.splits import split_classes
from components.errors import DataError
from tests.conftest import params_with

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = dict(seed=0, class_ratio=(107, 20, 40), val_classes=None, test_classes=None, queries_per_class=2,
                classifier_train_fraction=0.7, min_images_per_class=6)


def make_manifest(sizes: dict[str, int]) -> pd.DataFrame:
    rows = [
        {"id": hashlib.sha256(f"{label}/{i}".encode()).hexdigest(), "label": label, "uri": f"raw/{label}/{i}.jpg",
         "width": 64, "height": 64, "format": "JPEG", "bytes": 1000}
        for label, n in sizes.items()
        for i in range(n)
    ]
    return pd.DataFrame(rows)


def split(manifest: pd.DataFrame, **overrides):
    return split_classes(manifest, **(DEFAULTS | overrides))


def classes_of(splits: pd.DataFrame, *names: str) -> set[str]:
    return set(splits.loc[splits["split"].isin(names), "label"])


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return make_manifest({f"c{i:03d}": 10 for i in range(100)})


def test_classes_are_disjoint_and_follow_the_ratio(manifest: pd.DataFrame) -> None:
    result = split(manifest)
    s = result.splits
    assert list(s.columns) == SPLIT_COLUMNS
    train, val, test = classes_of(s, "cls_train", "cls_val"), classes_of(s, "val"), classes_of(s, "test")
    assert not (train & val or train & test or val & test)
    assert (len(train), len(val), len(test)) == (64, 12, 24)  # 100 * 20/167 -> 12, 100 * 40/167 -> 24
    assert result.report["classes"] == {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
    assert sorted(s["id"]) == sorted(manifest["id"])
    assert set(s["role"]) == {"train", "query", "db"}


def test_protocol_counts(manifest: pd.DataFrame) -> None:
    result = split(manifest, queries_per_class=3)
    s = result.splits
    retrieval = s[s["split"].isin(["val", "test"])]
    assert (retrieval[retrieval["role"] == "query"].groupby("label").size() == 3).all()
    assert (retrieval[retrieval["role"] == "db"].groupby("label").size() == 7).all()
    train = s[s["split"].isin(["cls_train", "cls_val"])]
    assert (train["role"] == "train").all()
    per_class = train.groupby(["label", "split"]).size().unstack()
    assert (per_class["cls_train"] == 7).all() and (per_class["cls_val"] == 3).all()
    assert result.report["images"] == {
        "cls_train": {"train": 64 * 7}, "cls_val": {"train": 64 * 3},
        "val": {"db": 12 * 7, "query": 12 * 3}, "test": {"db": 24 * 7, "query": 24 * 3},
    }


def test_same_seed_is_identical_whatever_the_row_order(manifest: pd.DataFrame) -> None:
    first = split(manifest).splits
    pd.testing.assert_frame_equal(first, split(manifest).splits)
    shuffled = manifest.sample(frac=1.0, random_state=7).reset_index(drop=True)
    pd.testing.assert_frame_equal(first, split(shuffled).splits)


def test_different_seed_changes_the_assignment(manifest: pd.DataFrame) -> None:
    a, b = split(manifest, seed=0).splits, split(manifest, seed=1).splits
    assert classes_of(a, "test") != classes_of(b, "test")


def test_explicit_class_counts_override_the_ratio(manifest: pd.DataFrame) -> None:
    s = split(manifest, val_classes=20, test_classes=40).splits
    assert (len(classes_of(s, "cls_train")), len(classes_of(s, "val")), len(classes_of(s, "test"))) == (40, 20, 40)


def test_train_fraction_keeps_at_least_one_image_each_side() -> None:
    s = split(make_manifest({f"c{i}": 6 for i in range(8)}), classifier_train_fraction=0.99, min_images_per_class=2,
              val_classes=1, test_classes=1).splits
    per_class = s[s["role"] == "train"].groupby(["label", "split"]).size().unstack()
    assert (per_class["cls_train"] == 5).all() and (per_class["cls_val"] == 1).all()


def test_classes_with_too_few_images_are_excluded_with_a_reason() -> None:
    sizes = {f"c{i}": 8 for i in range(10)} | {"tiny": 5, "two": 2}
    result = split(make_manifest(sizes), queries_per_class=2, min_images_per_class=6)
    assert result.report["excluded"] == {"tiny": "5 images < 6 needed", "two": "2 images < 6 needed"}
    assert not {"tiny", "two"} & set(result.splits["label"])
    result = split(make_manifest(sizes), queries_per_class=7, min_images_per_class=2)
    assert result.report["excluded"] == {"tiny": "5 images < 8 needed", "two": "2 images < 8 needed"}


@pytest.mark.parametrize(
    ("sizes", "overrides", "message"),
    [
        ({"a": 8, "b": 8}, {}, r"cannot split 2 eligible classes .* need at least 5 eligible classes"),
        ({f"c{i}": 8 for i in range(10)}, {"val_classes": 4, "test_classes": 6},
         r"train/val/test = 0/4/6 .* need at least 11 eligible classes"),
        ({f"c{i}": 3 for i in range(10)}, {}, r"cannot split 0 eligible classes .*10 classes have fewer"),
    ],
)
def test_impossible_split_is_a_data_error(sizes: dict, overrides: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        split(make_manifest(sizes), **overrides)


PARAMS = params_with({"ingest": {"source": "raw", "exclude_classes": ["BACKGROUND_Google"], "workers": 2},
                      "split": {"seed": 3, "queries_per_class": 2}})


def run_module(module: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_ingest_and_split_stages_end_to_end(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for c in range(8):
        for i in range(6):
            path = tmp_path / "raw" / f"class{c}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    (tmp_path / "raw" / "BACKGROUND_Google").mkdir()
    Image.new("RGB", (50, 50)).save(tmp_path / "raw" / "BACKGROUND_Google" / "tmp", format="JPEG")
    (tmp_path / "raw" / "class0" / "broken.jpg").write_text("nope")
    (tmp_path / "params.yaml").write_text(PARAMS)

    for stage in ("scan", "ingest"):
        ingest_run = run_module(f"pipelines.{stage}", tmp_path)
        assert ingest_run.returncode == 0, ingest_run.stderr
    assert "kept 48 images in 8 classes from raw; quarantined 1" in ingest_run.stderr
    manifest = pd.read_parquet(tmp_path / "data" / "manifest.parquet")
    report = json.loads((tmp_path / "data" / "ingest_report.json").read_text())
    assert len(manifest) == 48 and manifest["uri"].str.startswith("raw/class").all()
    assert report["quarantine"] == [{"file": "raw/class0/broken.jpg", "reason": "not an image (cannot identify format)"}]
    assert report["excluded_classes"] == {"BACKGROUND_Google": 1}

    split_run = run_module("pipelines.split", tmp_path)
    assert split_run.returncode == 0, split_run.stderr
    splits = pd.read_parquet(tmp_path / "data" / "splits.parquet")
    split_report = json.loads((tmp_path / "data" / "split_report.json").read_text())
    assert split_report["class_counts"] == {"train": 5, "val": 1, "test": 2}
    assert split_report["seed"] == 3
    assert sorted(splits["id"]) == sorted(manifest["id"])
    assert sorted(os.listdir(tmp_path / "data")) == [
        "ingest_report.json", "listing.parquet", "listing_report.json", "manifest.parquet", "split_report.json",
        "splits.parquet"
    ]


def test_split_stage_without_manifest_exits_2(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(PARAMS)
    proc = run_module("pipelines.split", tmp_path)
    assert proc.returncode == 2
    assert "data/manifest.parquet: no such file (run the ingest stage first)" in proc.stderr
    assert "Traceback" not in proc.stderr


def _splits_table() -> pd.DataFrame:
    return split_classes(make_manifest({f"c{i}": 8 for i in range(10)}), seed=0, class_ratio=(6, 2, 2), val_classes=None,
                         test_classes=None, queries_per_class=2, classifier_train_fraction=0.7, min_images_per_class=6).splits


def test_the_splits_contract_accepts_a_split_and_gives_each_subset_in_one_order():
    splits = check_splits(_splits_table().sample(frac=1, random_state=0), "splits.parquet")  # any row order
    for rows in (splits.train_images(), splits.classifier_train(), splits.val_set(), splits.test_queries(),
                 splits.test_database()):
        assert rows[["label", "id"]].equals(rows[["label", "id"]].sort_values(["label", "id"], ignore_index=True))
    assert len(splits.test_queries()) == 2 * 2 and set(splits.test_database()["role"]) == {"db"}
    assert len(splits.classifier_train()) + len(splits.classifier_val()) == len(splits.train_images()) == 6 * 8
    assert splits.train_classes() == sorted(set(splits.train_images()["label"]))


@pytest.mark.parametrize("corrupt, message", [
    (lambda t: t.drop(columns="role"), "splits.parquet: not a splits table: no column\\(s\\) role"),
    (lambda t: t.assign(split=t["split"].replace("val", "valid")), "unknown split value\\(s\\) \\['valid'\\]"),
    (lambda t: t.assign(role=t["role"].where(t["split"] != "test", "train")), "split test have role\\(s\\) \\['train'\\]"),
    (lambda t: pd.concat([t, t.iloc[:1]]), "is on more than one row"),
    (lambda t: t.assign(label=t["label"].where(t["split"] != "test", "c0")), "class 'c0' is in more than one of"),
    (lambda t: t.assign(uri=t["uri"].where(t.index != 3, None)), "missing values in column\\(s\\) uri"),
])
def test_the_splits_contract_rejects_a_malformed_table(corrupt, message):
    with pytest.raises(DataError, match=message):
        check_splits(corrupt(_splits_table()), "splits.parquet")
