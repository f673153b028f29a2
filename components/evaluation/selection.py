"""Training-free search choices made on the val classes only: resolution and scales, whitening, DBA, αQE or
k-reciprocal re-ranking — one step after the other, each step keeping its best candidate by leave-one-out val mAP.

Every step has "leave it as it is" among its candidates (no whitening, k = 0, the current reranking), so the chosen
recipe can never score below its starting point on val.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import numpy.typing as npt

from components.evaluation.protocol import leave_one_out_map
from components.models.whitening import fit_centering, fit_learned_whitening, fit_pca_whitening
from components.search.postprocess import KReciprocal, Reranking

log = logging.getLogger(__name__)

WHITENINGS = ("none", "center", "pca", "learned")
Embed = Callable[[int, tuple[float, ...], str], npt.NDArray[np.float32]]  # (image size, scales, which set) -> descriptors


@dataclass(frozen=True)
class Whitener:
    """A whitening candidate: none, mean-centering, PCA-whitening or the supervised learned whitening (Lw), with the
    kept dimensionality (None: all) and eigenvalue shrinkage towards their mean (components.models.whitening)."""

    kind: str = "none"
    dim: int | None = None
    shrinkage: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in WHITENINGS:
            raise ValueError(f"unknown whitening {self.kind!r}; expected one of {WHITENINGS}")

    def fit(self, descriptors: np.ndarray, labels: Sequence) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean, projection) learned on training descriptors, or None for no whitening."""
        if self.kind == "none":
            return None
        if self.kind == "center":
            return fit_centering(descriptors)
        dim = None if self.dim is None else min(self.dim, descriptors.shape[1], len(descriptors) - 1)
        if self.kind == "pca":
            return fit_pca_whitening(descriptors, dim, shrinkage=self.shrinkage)
        return fit_learned_whitening(descriptors, np.asarray(labels), dim, shrinkage=self.shrinkage)

    def describe(self) -> str:
        if self.kind in ("none", "center"):
            return self.kind
        return f"{self.kind} (dim {self.dim or 'all'}, shrinkage {self.shrinkage:g})"


def whiten(descriptors: np.ndarray, fitted: tuple[np.ndarray, np.ndarray] | None) -> npt.NDArray[np.float32]:
    """y = L2(P(x − μ)): what RetrievalNet's whitening layer computes."""
    if fitted is None:
        return np.asarray(descriptors, dtype=np.float32)
    mean, projection = fitted
    y = (np.asarray(descriptors, dtype=np.float64) - mean) @ np.asarray(projection, dtype=np.float64).T
    return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Candidates:
    """The choices tried, step by step. dba_k/qe_k of 0 mean off; every list holds at least one entry."""

    image_sizes: tuple[int, ...]
    scale_sets: tuple[tuple[float, ...], ...]
    whiteners: tuple[Whitener, ...]
    dba: tuple[tuple[int, float], ...]  # (k, α)
    qe: tuple[tuple[int, float], ...]
    k_reciprocal: tuple[KReciprocal, ...]  # tried in place of DBA and αQE


@dataclass(frozen=True)
class Recipe:
    """How a network's descriptors are made and ranked: the chosen answer of `choose_recipe`."""

    image_size: int
    scales: tuple[float, ...]
    whitener: Whitener = Whitener()
    reranking: Reranking = Reranking()

    def describe(self) -> str:
        return (f"{self.image_size} px, scales {list(self.scales)}, whitening {self.whitener.describe()}, "
                f"reranking {self.reranking.describe()}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Choice:
    """The chosen recipe, its fitted whitening, and every candidate's val mAP in the order tried."""

    recipe: Recipe
    whitening: tuple[np.ndarray, np.ndarray] | None
    trials: list[dict] = field(default_factory=list)

    @property
    def start_map(self) -> float:
        return self.trials[0]["val_map"]

    @property
    def best_map(self) -> float:
        return max(t["val_map"] for t in self.trials)


def choose_recipe(embed: Embed, val_labels: Sequence, train_labels: Sequence, candidates: Candidates) -> Choice:
    """Choose, on val only: (image size, scales), then whitening (fit on the train set's descriptors at that
    resolution), then DBA, then αQE, then k-reciprocal re-ranking. `embed(size, scales, "val" |
    "train")` returns the un-whitened descriptors of that set. k-reciprocal re-ranking is tried in place of DBA and
    αQE. A later step replaces the current choice only when it scores strictly higher, so ties keep the simpler
    option tried first."""
    trials: list[dict] = []

    def tried(step: str, option: str, value: float) -> float:
        trials.append({"step": step, "option": option, "val_map": round(value, 6)})
        log.debug("%s %s: val mAP %.4f", step, option, value)
        return value

    best, best_map, val = None, -1.0, None
    for size in candidates.image_sizes:
        for scales in candidates.scale_sets:
            desc = embed(size, scales, "val")
            score = tried("resolution", f"{size} px, scales {list(scales)}", leave_one_out_map(desc, val_labels, Reranking()))
            if score > best_map:
                best, best_map, val = Recipe(size, tuple(scales)), score, desc
    assert best is not None and val is not None

    fitted, whitened = None, val
    if any(w.kind != "none" for w in candidates.whiteners):
        train = embed(best.image_size, best.scales, "train")
        for whitener in candidates.whiteners:
            if whitener.kind == "none":
                continue
            try:
                params = whitener.fit(train, train_labels)
            except ValueError as e:  # e.g. too few training pairs for Lw: not a candidate here
                log.warning("whitening %s skipped: %s", whitener.describe(), e)
                continue
            candidate = whiten(val, params)
            score = tried("whitening", whitener.describe(), leave_one_out_map(candidate, val_labels, Reranking()))
            if score > best_map:
                best, best_map, fitted, whitened = replace(best, whitener=whitener), score, params, candidate

    def rerank_step(step: str, options: list[Reranking]) -> None:
        nonlocal best, best_map
        for reranking in options:
            score = tried(step, reranking.describe(), leave_one_out_map(whitened, val_labels, reranking))
            if score > best_map:
                best, best_map = replace(best, reranking=reranking), score

    rerank_step("dba", [Reranking(dba_k=k, dba_alpha=a) for k, a in candidates.dba if k])
    base = best.reranking
    rerank_step("qe", [replace(base, qe_k=k, qe_alpha=a) for k, a in candidates.qe if k])
    rerank_step("k-reciprocal", [Reranking(k_reciprocal=kr) for kr in candidates.k_reciprocal])
    log.info("chosen on val: %s (val mAP %.4f → %.4f)", best.describe(), trials[0]["val_map"], best_map)
    return Choice(best, fitted, trials)
