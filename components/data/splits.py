"""Class-disjoint splits for retrieval: train classes (classifier train/val), val and test classes (query/db)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import pandas as pd

from components.data.contract import ORDER, SPLIT_COLUMNS, Role, Split
from components.errors import DataError



@dataclass(frozen=True)
class SplitResult:
    splits: pd.DataFrame
    report: dict[str, Any]


def split_classes(
    manifest: pd.DataFrame,
    *,
    seed: int,
    class_ratio: tuple[float, float, float],
    val_classes: int | None,
    test_classes: int | None,
    queries_per_class: int,
    classifier_train_fraction: float,
    min_images_per_class: int,
) -> SplitResult:
    """Assign whole classes to train/val/test, then images to roles, deterministically from `seed`.

    Class counts follow `class_ratio` (train, val, test), rounded, unless `val_classes`/`test_classes` are given;
    each split needs at least one class. Classes with fewer than max(min_images_per_class, queries_per_class + 1)
    images are left out. Val/test classes get `queries_per_class` queries, the rest is the database; train
    classes are split `classifier_train_fraction` / rest into cls_train / cls_val (at least one image each).
    The result does not depend on the manifest's row order. Raises `DataError` if the split is impossible.
    """
    missing = [c for c in ("id", "label", "uri") if c not in manifest.columns]
    if missing:
        raise DataError(f"manifest lacks column(s) {', '.join(missing)}")
    if manifest["id"].duplicated().any():
        raise DataError(f"manifest has duplicate ids, e.g. {manifest['id'][manifest['id'].duplicated()].iloc[0]}")
    if any(r <= 0 for r in class_ratio):
        raise DataError(f"class_ratio (train, val, test) must be positive, got {tuple(class_ratio)}")
    if any(n is not None and n < 1 for n in (val_classes, test_classes)):
        raise DataError(f"val_classes and test_classes must be >= 1, got {val_classes} and {test_classes}")
    rows = manifest[["id", "label", "uri"]].sort_values(ORDER, ignore_index=True)
    by_label = {str(label): group for label, group in rows.groupby("label", sort=True)}
    sizes = {label: len(group) for label, group in by_label.items()}
    needed = max(min_images_per_class, queries_per_class + 1, 2)
    excluded = {label: f"{n} images < {needed} needed" for label, n in sizes.items() if n < needed}
    eligible = [label for label, n in sizes.items() if n >= needed]

    counts = _class_counts(len(eligible), class_ratio, val_classes, test_classes)
    if min(counts) < 1:
        enough = _classes_needed(class_ratio, val_classes, test_classes)
        raise DataError(
            f"cannot split {len(eligible)} eligible classes into train/val/test = {counts[0]}/{counts[1]}/{counts[2]} "
            f"classes: each needs at least one; these settings need at least {enough} eligible classes "
            f"(a class is eligible with >= {needed} images; {len(excluded)} classes have fewer)"
        )
    order = random.Random(seed).sample(eligible, len(eligible))
    n_train, n_val, _ = counts
    assigned = {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train:n_train + n_val]),
        "test": sorted(order[n_train + n_val:]),
    }

    parts: list[pd.DataFrame] = []
    for group, labels in assigned.items():
        for label in labels:
            cls = by_label[label].copy()
            rng = random.Random(f"{seed}/{label}")
            if group == "train":
                n_fit = min(max(round(len(cls) * classifier_train_fraction), 1), len(cls) - 1)
                picked = set(rng.sample(range(len(cls)), n_fit))
                cls["split"] = [Split.CLS_TRAIN if i in picked else Split.CLS_VAL for i in range(len(cls))]
                cls["role"] = Role.TRAIN
            else:
                picked = set(rng.sample(range(len(cls)), queries_per_class))
                cls["split"] = Split(group)
                cls["role"] = [Role.QUERY if i in picked else Role.DB for i in range(len(cls))]
            parts.append(cls)
    splits = pd.concat(parts, ignore_index=True).sort_values(ORDER, ignore_index=True)[SPLIT_COLUMNS]
    splits[["split", "role"]] = splits[["split", "role"]].astype(str)

    images = {
        split: {role: int(n) for role, n in splits[splits["split"] == split].groupby("role").size().items()}
        for split in Split
    }
    report = {
        "seed": seed,
        "classes": assigned,
        "class_counts": {group: len(labels) for group, labels in assigned.items()},
        "images": images,
        "excluded": excluded,
    }
    return SplitResult(splits=splits, report=report)


def _class_counts(
    n_classes: int, ratio: tuple[float, float, float], val_classes: int | None, test_classes: int | None
) -> tuple[int, int, int]:
    """(train, val, test) class counts: explicit counts win, otherwise the rounded share of `ratio`."""
    total = sum(ratio)
    n_val = val_classes if val_classes is not None else round(n_classes * ratio[1] / total)
    n_test = test_classes if test_classes is not None else round(n_classes * ratio[2] / total)
    return n_classes - n_val - n_test, n_val, n_test


def _classes_needed(ratio: tuple[float, float, float], val_classes: int | None, test_classes: int | None) -> str:
    """The fewest classes for which `_class_counts` gives every split at least one, as text, found by a bounded
    scan: the val/test shares round to >= 1 from about total / (2 × share) classes on, and train takes the rest."""
    total = sum(ratio)
    shares = [r for r, explicit in zip(ratio[1:], (val_classes, test_classes)) if explicit is None]
    start = max(3, (val_classes or 0) + (test_classes or 0) + 1, *(math.floor(total / (2 * r)) - 1 for r in shares))
    for c in range(start, start + _SCAN_LIMIT):
        if min(_class_counts(c, ratio, val_classes, test_classes)) >= 1:
            return str(c)
    return f"more than {start + _SCAN_LIMIT - 1}"


_SCAN_LIMIT = 100_000
