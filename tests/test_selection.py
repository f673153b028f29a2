"""Choices on val: each step keeps its best candidate, never below the start, whitening fit on train only."""

import numpy as np
import pytest

from components.evaluation.protocol import leave_one_out_map
from components.evaluation.selection import Candidates, Whitener, choose_recipe, whiten
from components.models.localise import ObjectCrop
from components.search.postprocess import KReciprocal, Reranking
from pipelines.params import load_params
from pipelines.postprocess import candidates


def _clusters(n_classes: int, per_class: int, noise: float, seed: int, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    x = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


VAL, VAL_LABELS = _clusters(6, 8, 1.5, 0)
TRAIN, TRAIN_LABELS = _clusters(10, 8, 1.5, 1)
NONE = Candidates(image_sizes=(160,), scale_sets=((1.0,),), whiteners=(Whitener(),), dba=((0, 3.0),), qe=((0, 3.0),),
                  k_reciprocal=())


def _embedder(noise_by_size: dict[int, float], calls: list, noise_by_crop: dict | None = None):
    def embed(size, scales, crop, which):
        calls.append((size, scales, crop, which))
        if which == "train":
            return TRAIN
        noise = noise_by_size[size] if crop is None else noise_by_crop[crop]
        return _clusters(6, 8, noise, 0)[0]  # the same centres: only the noise differs by size or crop
    return embed


def test_the_resolution_with_less_noise_wins_and_nothing_else_is_tried_when_off():
    calls = []
    choice = choose_recipe(_embedder({160: 1.5, 224: 0.5}, calls), VAL_LABELS, TRAIN_LABELS,
                           Candidates(**{**NONE.__dict__, "image_sizes": (160, 224)}))
    assert choice.recipe.image_size == 224 and choice.recipe.reranking == Reranking()
    assert [t["step"] for t in choice.trials] == ["resolution", "resolution"]
    assert choice.best_map > choice.start_map == choice.trials[0]["val_map"]
    assert all(which == "val" for *_, which in calls)  # no train descriptors without a whitening candidate


def test_every_step_keeps_the_start_when_nothing_beats_it():
    calls = []
    choice = choose_recipe(_embedder({160: 1.5}, calls), VAL_LABELS, TRAIN_LABELS,
                           Candidates(**{**NONE.__dict__, "dba": ((0, 3.0), (2, 3.0)), "qe": ((0, 3.0), (2, 1.0)),
                                         "k_reciprocal": (KReciprocal(5, 2, 0.3),)}))
    assert choice.best_map >= choice.start_map
    assert {t["step"] for t in choice.trials} == {"resolution", "dba", "qe", "k-reciprocal"}
    chosen = max(choice.trials, key=lambda t: t["val_map"])["val_map"]
    assert choice.best_map == chosen
    # the chosen recipe's own score on val is the best trial's
    assert leave_one_out_map(VAL, VAL_LABELS, choice.recipe.reranking) == pytest.approx(chosen, abs=1e-6)


def test_whitening_is_fit_on_train_descriptors_and_scored_on_val():
    calls = []
    choice = choose_recipe(_embedder({160: 1.5}, calls), VAL_LABELS, TRAIN_LABELS,
                           Candidates(**{**NONE.__dict__, "whiteners": (Whitener(), Whitener("center"),
                                                                        Whitener("pca", None, 0.5))}))
    assert (160, (1.0,), None, "train") in calls
    scored = {t["option"]: t["val_map"] for t in choice.trials if t["step"] == "whitening"}
    assert set(scored) == {"center", "pca (dim all, shrinkage 0.5)"}
    fitted = Whitener("pca", None, 0.5).fit(TRAIN, TRAIN_LABELS)
    assert scored["pca (dim all, shrinkage 0.5)"] == pytest.approx(
        leave_one_out_map(whiten(VAL, fitted), VAL_LABELS, Reranking()), abs=1e-6)
    if choice.recipe.whitener.kind == "none":
        assert choice.whitening is None and max(scored.values()) <= choice.start_map
    else:
        assert choice.whitening is not None


def test_params_candidates_start_from_the_model_resolution_and_include_none():
    params = load_params("params.yaml")
    c = candidates(params.postprocess, params.model.image_size)
    assert c.image_sizes[0] == params.model.image_size and c.scale_sets[0] == (1.0,)
    assert c.whiteners[0] == Whitener("none")
    assert {w.kind for w in c.whiteners} == {"none", *params.postprocess.whitening.kinds}
    assert (0, params.postprocess.dba.alpha[0]) in c.dba


@pytest.mark.parametrize("crop_noise, chosen", [(0.5, ObjectCrop(0.2, 0.1)), (3.0, None)])
def test_an_object_crop_is_kept_only_when_it_beats_the_uncropped_descriptors_on_val(crop_noise, chosen):
    calls = []
    crop = ObjectCrop(0.2, 0.1)
    choice = choose_recipe(_embedder({160: 1.5}, calls, {crop: crop_noise}), VAL_LABELS, TRAIN_LABELS,
                           Candidates(**{**NONE.__dict__, "whiteners": (Whitener(), Whitener("center")),
                                         "object_crops": (crop,)}))
    assert [t["step"] for t in choice.trials][:2] == ["resolution", "object crop"]
    assert choice.recipe.object_crop == chosen
    assert (160, (1.0,), chosen, "train") in calls  # whitening is fit on descriptors made the chosen way
    assert ("object crop (threshold 0.2, margin 0.1)" in choice.recipe.describe()) == (chosen is not None)


def test_params_object_crop_candidates_carry_the_margin():
    params = load_params("params.yaml")
    c = candidates(params.postprocess, params.model.image_size)
    assert [(crop.threshold, crop.margin) for crop in c.object_crops] == [
        (t, params.postprocess.object_crop.margin) for t in params.postprocess.object_crop.thresholds]
