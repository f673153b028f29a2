"""The data contract between stages: the manifest's and the splits' columns and values, checked on load, and the
splits' subsets as accessors, each in one fixed order (label, then id)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import pandas as pd

from components.errors import DataError

ID, LABEL, URI, SPLIT, ROLE = "id", "label", "uri", "split", "role"
MANIFEST_COLUMNS = [ID, LABEL, URI, "width", "height", "format", "bytes"]
SPLIT_COLUMNS = [ID, LABEL, URI, SPLIT, ROLE]
ORDER = [LABEL, ID]  # every subset's row order


class Split(StrEnum):
    CLS_TRAIN = "cls_train"  # train classes, the classifier's training images
    CLS_VAL = "cls_val"      # train classes, the classifier's validation images
    VAL = "val"              # validation classes (model selection)
    TEST = "test"            # test classes (touched once)


class Role(StrEnum):
    TRAIN = "train"
    QUERY = "query"
    DB = "db"


ROLES_OF = {Split.CLS_TRAIN: {Role.TRAIN}, Split.CLS_VAL: {Role.TRAIN}, Split.VAL: {Role.QUERY, Role.DB},
            Split.TEST: {Role.QUERY, Role.DB}}


@dataclass(frozen=True)
class Splits:
    """A checked splits table (see `check_splits`) and its subsets."""

    table: pd.DataFrame

    def _rows(self, mask: pd.Series) -> pd.DataFrame:
        return self.table[mask].sort_values(ORDER, ignore_index=True)

    def train_classes(self) -> list[str]:
        return sorted(self.table.loc[self.table[ROLE] == Role.TRAIN, LABEL].unique())

    def train_images(self) -> pd.DataFrame:
        """Every image of the train classes (what retrieval fine-tuning and whitening learn from)."""
        return self._rows(self.table[ROLE] == Role.TRAIN)

    def classifier_train(self) -> pd.DataFrame:
        return self._rows(self.table[SPLIT] == Split.CLS_TRAIN)

    def classifier_val(self) -> pd.DataFrame:
        return self._rows(self.table[SPLIT] == Split.CLS_VAL)

    def val_set(self) -> pd.DataFrame:
        """The val classes' queries and database images (the role column says which)."""
        return self._rows(self.table[SPLIT] == Split.VAL)

    def test_queries(self) -> pd.DataFrame:
        return self._rows((self.table[SPLIT] == Split.TEST) & (self.table[ROLE] == Role.QUERY))

    def test_database(self) -> pd.DataFrame:
        return self._rows((self.table[SPLIT] == Split.TEST) & (self.table[ROLE] == Role.DB))


def check_splits(table: pd.DataFrame, source: str) -> Splits:
    """`table` as `Splits` if it keeps the contract, else a `DataError` naming `source` and the first problem:
    the columns, no missing values, unique ids, known split and role values that fit each other, and classes that
    are disjoint between train, val and test."""
    missing = [c for c in SPLIT_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{source}: not a splits table: no column(s) {', '.join(missing)}")
    table = table[SPLIT_COLUMNS]
    empty = [c for c in SPLIT_COLUMNS if table[c].isna().any()]
    if empty:
        raise DataError(f"{source}: missing values in column(s) {', '.join(empty)}")
    if table[ID].duplicated().any():
        raise DataError(f"{source}: id {table[ID][table[ID].duplicated()].iloc[0]} is on more than one row")
    for column, allowed in ((SPLIT, Split), (ROLE, Role)):
        unknown = sorted(set(table[column].astype(str)) - {v.value for v in allowed})
        if unknown:
            raise DataError(f"{source}: unknown {column} value(s) {unknown}; expected {[v.value for v in allowed]}")
    for split, roles in ROLES_OF.items():
        wrong = sorted(set(table.loc[table[SPLIT] == split, ROLE]) - roles)
        if wrong:
            raise DataError(f"{source}: rows of split {split} have role(s) {wrong}; expected {sorted(roles)}")
    group = table[SPLIT].map({Split.CLS_TRAIN: "train", Split.CLS_VAL: "train", Split.VAL: "val", Split.TEST: "test"})
    shared = table.assign(group=group).groupby(LABEL)["group"].nunique()
    if (shared > 1).any():
        raise DataError(f"{source}: class {shared[shared > 1].index[0]!r} is in more than one of train, val and test")
    return Splits(table.reset_index(drop=True))
