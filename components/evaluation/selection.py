"""Training-free search choices made on the val classes only: resolution and scales, object crops, whitening, DBA,
αQE or k-reciprocal re-ranking — one step after the other, each step keeping its best candidate by leave-one-out val mAP.

Every step has "leave it as it is" among its candidates (no crop, no whitening, k = 0, the current reranking), so the chosen
recipe can never score below its starting point on val.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import numpy.typing as npt

from components.evaluation.protocol import leave_one_out_map
from components.models.localise import ObjectCrop
from components.models.whitening import fit_centering, fit_learned_whitening, fit_pca_whitening
from components.search.postprocess import KReciprocal, Reranking

log = logging.getLogger(__name__)

WHITENINGS = ("none", "center", "pca", "learned")
# (image size, scales, object crop or None, which set) -> descriptors
Embed = Callable[[int, tuple[float, ...], ObjectCrop | None, str], npt.NDArray[np.float32]]


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
        dim = min(self.dim or descriptors.shape[1], descriptors.shape[1], len(descriptors) - 1)  # centred data span n − 1
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
    object_crops: tuple[ObjectCrop, ...] = ()  # tried after the resolution (none is always the first candidate)


@dataclass(frozen=True)
class Recipe:
    """How a network's descriptors are made and ranked: the chosen answer of `choose_recipe`."""

    image_size: int
    scales: tuple[float, ...]
    object_crop: ObjectCrop | None = None
    whitener: Whitener = Whitener()
    reranking: Reranking = Reranking()

    def describe(self) -> str:
        crop = f", {self.object_crop.describe()}" if self.object_crop else ""
        return (f"{self.image_size} px, scales {list(self.scales)}{crop}, whitening {self.whitener.describe()}, "
                f"reranking {self.reranking.describe()}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Choice:
    """The chosen recipe, its fitted whitening, every candidate's val mAP in the order tried, and the chosen one's."""

    recipe: Recipe
    whitening: tuple[np.ndarray, np.ndarray] | None
    trials: list[dict]
    best_map: float

    @property
    def start_map(self) -> float:
        return self.trials[0]["val_map"]


def choose_recipe(embed: Embed, val_labels: Sequence, train_labels: Sequence, candidates: Candidates) -> Choice:
    """Choose, on val only: (image size, scales), then an object crop, then whitening (fit on the train set's
    descriptors made that way), then DBA, then αQE, then k-reciprocal re-ranking in place of both — the reranking
    steps from no whitening and from the best whitening alike, the better end kept. `embed(size, scales, crop,
    "val" | "train")` returns the un-whitened descriptors of that set. A step replaces the current choice only when it scores strictly higher,
    so ties keep the simpler option tried first."""
    trials: list[dict] = []

    def tried(step: str, option: str, value: float) -> float:
        value = round(value, 6)  # as recorded: choices compare what choice.json shows
        trials.append({"step": step, "option": option, "val_map": value})
        log.debug("%s %s: val mAP %.4f", step, option, value)
        return value

    best, best_map, val = None, -1.0, None
    for size in candidates.image_sizes:
        for scales in candidates.scale_sets:
            desc = embed(size, scales, None, "val")
            score = tried("resolution", f"{size} px, scales {list(scales)}", leave_one_out_map(desc, val_labels, Reranking()))
            if score > best_map:
                best, best_map, val = Recipe(size, tuple(scales)), score, desc
    assert best is not None and val is not None
    for crop in candidates.object_crops:
        desc = embed(best.image_size, best.scales, crop, "val")
        score = tried("object crop", crop.describe(), leave_one_out_map(desc, val_labels, Reranking()))
        if score > best_map:
            best, best_map, val = replace(best, object_crop=crop), score, desc

    # whitening: the best one found goes on to the reranking steps beside "none" (reranking may favour either)
    branches = [(best, best_map, None, val)]
    if any(w.kind != "none" for w in candidates.whiteners):
        train = embed(best.image_size, best.scales, best.object_crop, "train")
        top = None
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
            if top is None or score > top[1]:
                top = (replace(best, whitener=whitener), score, params, candidate)
        if top is not None:
            branches.append(top)

    results = []
    for recipe, score, fitted, descriptors in branches:
        recipe, score = _rerank_steps(recipe, score, descriptors, val_labels, candidates, tried)
        results.append((recipe, score, fitted))
    best, best_map, fitted = max(results, key=lambda r: r[1])  # the first (no whitening) on a tie
    log.info("chosen on val: %s (val mAP %.4f → %.4f)", best.describe(), trials[0]["val_map"], best_map)
    return Choice(best, fitted, trials, best_map)


def _rerank_steps(recipe: Recipe, score: float, descriptors: np.ndarray, labels: Sequence, candidates: Candidates,
                  tried: Callable[[str, str, float], float]) -> tuple[Recipe, float]:
    """DBA, then αQE on the chosen DBA, then k-reciprocal in place of both, from `recipe` (scoring `score`): each
    candidate kept only when strictly better."""
    def step(name: str, options: list[Reranking]) -> None:
        nonlocal recipe, score
        for reranking in options:
            value = tried(name, f"{recipe.whitener.describe()} + {reranking.describe()}",
                          leave_one_out_map(descriptors, labels, reranking))
            if value > score:
                recipe, score = replace(recipe, reranking=reranking), value

    step("dba", [Reranking(dba_k=k, dba_alpha=a) for k, a in candidates.dba if k])
    base = recipe.reranking
    step("qe", [replace(base, qe_k=k, qe_alpha=a) for k, a in candidates.qe if k])
    step("k-reciprocal", [Reranking(k_reciprocal=kr) for kr in candidates.k_reciprocal])
    return recipe, score
