"""A hyper-parameter search space over params paths (plain Python, no Ray: params validation uses it too)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

Point = dict[str, Any]  # params path → value


@dataclass(frozen=True)
class Dimension:
    """One searched params path: its grid `values`, and the `low`..`high` range random/optuna draw from (`log`: on a
    log scale; `integer`: whole numbers). `above`: another path this one must exceed by at least `gap` (m− above m+)."""

    path: str
    values: tuple[Any, ...]
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    above: str | None = None
    gap: float = 0.0


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]

    def __post_init__(self) -> None:
        paths = self.paths
        if not paths or len(set(paths)) != len(paths):
            raise ValueError(f"a search space needs one or more distinct params paths, got {list(paths)}")
        for d in self.dimensions:
            if d.above is not None and (d.above not in paths or self[d.above].above is not None):
                raise ValueError(f"{d.path} is above {d.above}, which must be searched and above no other path")

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(d.path for d in self.dimensions)

    def __getitem__(self, path: str) -> Dimension:
        return next(d for d in self.dimensions if d.path == path)

    def keeps_order(self, point: Point) -> bool:
        """Whether each dimension of `point` is above the one it must exceed, by at least its gap."""
        return all(point[d.path] > point[d.above] and point[d.path] >= point[d.above] + d.gap
                   for d in self.dimensions if d.above)

    def grid_points(self) -> list[Point]:
        """Every combination of the dimensions' values that keeps the order, in value-list order."""
        combos = (dict(zip(self.paths, values)) for values in itertools.product(*(d.values for d in self.dimensions)))
        return [p for p in combos if self.keeps_order(p)]

    def range_corners(self) -> list[Point]:
        """The lowest and the highest point random/optuna may draw: every path at its low (a path above another
        lifted above it), and at its high (a path another must exceed lowered below that one's high)."""
        step = {d.above: max(d.gap, 1e-6) for d in self.dimensions if d.above}  # lower path → its upper's gap
        upper = {d.above: d.path for d in self.dimensions if d.above}
        low = {d.path: d.low for d in self.dimensions if d.above is None}
        low.update({d.path: max(d.low, low[d.above] + step[d.above]) for d in self.dimensions if d.above})
        high = {d.path: d.high for d in self.dimensions}
        high.update({lower: min(high[lower], high[upper[lower]] - step[lower]) for lower in upper})
        return [{d.path: round(p[d.path]) if d.integer else p[d.path] for d in self.dimensions} for p in (low, high)]

    def check(self, mode: str) -> None:
        """Raise ValueError when `mode` (grid, random, optuna) has nothing to run in this space."""
        if mode == "grid":
            if not self.grid_points():
                raise ValueError("no grid point keeps each path above the one it must exceed: "
                                 f"{ {d.path: list(d.values) for d in self.dimensions} }")
            return
        for d in self.dimensions:
            if d.low is None or d.high is None or d.low > d.high:
                raise ValueError(f"a {mode} search needs a range [low, high] for {d.path}")
        if not all(self.keeps_order(p) and all(self[k].low <= v <= self[k].high for k, v in p.items())
                   for p in self.range_corners()):
            raise ValueError("the ranges leave no point with each path above the one it must exceed: "
                             f"{ {d.path: [d.low, d.high] for d in self.dimensions} }")
