"""Stage postprocess: the training-free choices (resolution, scales, object crops, whitening, DBA, αQE or
k-reciprocal), made on
the val classes for the fine-tuned model and, as the best training-free baseline, for the off-the-shelf one. Writes
each as a search model: the network with its chosen whitening layer and a `meta` that says how to embed and rank."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from components.data.contract import LABEL, URI, Splits
from components.evaluation.selection import Candidates, Choice, Whitener, choose_recipe
from components.models.localise import ObjectCrop
from components.models.net import RetrievalNet, load_net, read_checkpoint, save_checkpoint
from components.search.embed import embed_images
from components.search.postprocess import KReciprocal
from components.storage import write_json
from components.training.context import BEST_MODEL_FILE
from pipelines._runner import run_stage
from pipelines.common import load_splits, off_the_shelf, stopwatch
from pipelines.params import Params, PostprocessParams
from pipelines.paths import METRICS_DIR, OFF_THE_SHELF_DIR, POSTPROCESS_CHOICE, RETRIEVAL_DIR, SEARCH_DIR

log = logging.getLogger(__name__)


def candidates(p: PostprocessParams, image_size: int) -> Candidates:
    """The params' candidates; the starting point (model.image_size, one scale, nothing else) is tried first."""
    whiteners = [Whitener("none")] + [
        Whitener(kind) if kind == "center" else Whitener(kind, dim, shrinkage)
        for kind in p.whitening.kinds
        for dim in ([None] if kind == "center" else p.whitening.dims)
        for shrinkage in ([0.0] if kind == "center" else p.whitening.shrinkages)
    ]
    scale_sets = [(1.0,)] + [tuple(s) for s in p.scale_sets if tuple(s) != (1.0,)]
    return Candidates(
        image_sizes=tuple(dict.fromkeys([image_size, *p.image_sizes])),
        scale_sets=tuple(scale_sets),
        whiteners=tuple(whiteners),
        dba=tuple((k, a) for k in p.dba.k for a in p.dba.alpha),
        qe=tuple((k, a) for k in p.qe.k for a in p.qe.alpha),
        k_reciprocal=tuple(KReciprocal(k1, min(k2, k1), lam) for k1 in p.k_reciprocal.k1
                           for k2 in p.k_reciprocal.k2 for lam in p.k_reciprocal.lambda_value),
        object_crops=tuple(ObjectCrop(t, p.object_crop.margin) for t in p.object_crop.thresholds),
    )


def choose(net: RetrievalNet, name: str, params: Params, splits: Splits) -> Choice:
    """The recipe for `net`, chosen on the val set; whitening is fit on the train classes' images."""
    sets = {"val": splits.val_set(), "train": splits.train_images()}
    cache: dict[tuple, np.ndarray] = {}

    def embed(size: int, scales: tuple[float, ...], crop: ObjectCrop | None, which: str) -> np.ndarray:
        key = (size, scales, crop, which)
        if key not in cache:
            _, cache[key] = embed_images(net, sets[which][URI].tolist(), batch_size=params.index.batch_size,
                                         image_size=size, scales=scales, object_crop=crop, progress=True,
                                         desc=f"{name}: {which} at {size} px x{len(scales)}{' cropped' if crop else ''}")
        return cache[key]

    return choose_recipe(embed, sets["val"][LABEL].to_numpy(), sets["train"][LABEL].to_numpy(),
                         candidates(params.postprocess, params.model.image_size))


def save_search_model(net: RetrievalNet, choice: Choice, out_dir: Path) -> None:
    """out_dir/best.pt: `net` with the chosen whitening as its layer and the recipe in its meta (image_size, scales,
    object_crop, reranking), so anything that loads it embeds and ranks as chosen; meta.json: that meta; choice.json: every
    candidate tried."""
    if net.whitening is not None:
        raise ValueError("the network already has a whitening layer: the postprocess stage chooses whitening")
    if choice.whitening is not None:
        net.set_whitening(*choice.whitening)
    recipe, chosen = choice.recipe, choice.recipe.as_dict()
    save_checkpoint(out_dir / BEST_MODEL_FILE, net, {
        "image_size": recipe.image_size, "scales": list(recipe.scales), "object_crop": chosen["object_crop"],
        "whitening": recipe.whitener.describe(), "reranking": chosen["reranking"],
    })
    write_json(out_dir / "meta.json", read_checkpoint(out_dir / BEST_MODEL_FILE)["meta"])
    write_json(out_dir / POSTPROCESS_CHOICE, {"recipe": recipe.as_dict(), "described": recipe.describe(),
                                         "val_map_start": choice.start_map, "val_map_chosen": choice.best_map,
                                         "trials": choice.trials})


def search_model(net: RetrievalNet, name: str, params: Params, splits: Splits, out_dir: Path) -> tuple[RetrievalNet, Choice]:
    """`net`'s recipe chosen on val, written to out_dir as a search model, and that model loaded back."""
    choice = choose(net, name, params, splits)
    save_search_model(net, choice, out_dir)
    return load_net(out_dir / BEST_MODEL_FILE), choice


def main(params: Params) -> None:
    summary, splits = {}, load_splits()
    with stopwatch() as timing:
        for name, net, out_dir in (("fine-tuned", load_net(RETRIEVAL_DIR / BEST_MODEL_FILE), SEARCH_DIR),
                                   ("off-the-shelf", off_the_shelf(params, splits), OFF_THE_SHELF_DIR)):
            _, choice = search_model(net, name, params, splits, out_dir)
            summary[name] = {"recipe": choice.recipe.describe(), "val_map_start": choice.start_map,
                             "val_map_chosen": choice.best_map}
    write_json(METRICS_DIR / "postprocess.json", {**summary, **timing})
    log.info("val mAP: fine-tuned %.4f → %.4f (%s); off-the-shelf %.4f → %.4f",
             summary["fine-tuned"]["val_map_start"], summary["fine-tuned"]["val_map_chosen"],
             summary["fine-tuned"]["recipe"], summary["off-the-shelf"]["val_map_start"],
             summary["off-the-shelf"]["val_map_chosen"])


if __name__ == "__main__":
    run_stage("postprocess", main)
