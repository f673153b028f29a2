"""The paper's ablation on the current split, in one command:

    python -m pipelines.ablation [--config configs/caltech101-ablation.yaml] [--row "cls + MS" ...]   # after `dvc repro`

Rows: off-the-shelf ImageNet (and with its training-free choices); retr-s (single margin, from ImageNet); retr-d
(double margin, from ImageNet); cls; cls + retr-d; cls + triplet; cls + MS (the retrieval params: multi-similarity
on P×K batches); MS alone (from ImageNet); cls + MS with its training-free choices (the full pipeline); MS with its
training-free choices, against off-the-shelf with its own (what fine-tuning adds beyond every free win); and the
issue-16 pieces: MS from ImageNet with each other pooling (NetVLAD, GeM + second order, MOP, multi-level fusion:
a checkpoint keeps its pooling, so these cannot start from the GeM classifier), object crops (off the shelf and on
cls + MS, no training), from the classifier the coupled clusters loss and the double margin with mined positives,
and cls + MS with 3 or 2 frozen stages instead of params' 4 (more of the network trained). Each trained row is a Ray
Train job with the `retrieval` params of params.yaml (only the row's own differences applied, and its `model` ones
for a pooling or frozen-stages row);
each row is scored on both test protocols with class-bootstrap CIs and compared with its parent row by a paired CI.
Writes docs/ablation.md and docs/ablation.json, and one MLflow run per row nested under an `ablation` run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import typer

from components import tracking
from components.data.contract import Splits
from components.errors import FiresightError
from components.evaluation.bootstrap import format_gain
from components.evaluation.protocol import Scores
from components.models.localise import ObjectCrop
from components.models.net import RetrievalNet, load_net
from components.storage import atomic_write_path, write_json
from components.training.context import BEST_MODEL_FILE
from components.training.retrieval import train_retrieval
from pipelines._runner import route_output, say
from pipelines.common import git_commit, load_splits, off_the_shelf, stopwatch, train_logged
from pipelines.embedding import test_scores
from pipelines.params import DEFAULT_PARAMS, Params, load_params, with_overrides
from pipelines.paths import CLASSIFY_DIR
from pipelines.postprocess import search_model
from pipelines.retrieval import retrieval_job, starting_nets


@dataclass(frozen=True)
class Row:
    name: str
    parent: str | None  # the row it is compared with (a paired CI of the difference); None for the first
    train: dict | None = None  # retrieval-params overrides of a trained row (`with_overrides`); None: no training
    model: dict | None = None  # model-params overrides (another pooling) of a trained row
    start: str = "imagenet"  # imagenet | classifier | <name of an earlier row> (no training, post-processing only)
    free_wins: bool = False  # the postprocess stage's training-free choices, made on val for this row's network
    object_crop: dict | None = None  # untrained rows: describe each image cropped to its activation box (ObjectCrop args)


def _retr(pos_margin: float) -> dict:
    """DeepFirearm's stage 2: the double margin (m+ 0: the single margin) on random pairs."""
    return {"criterion": {"name": "double_margin_contrastive",
                          "args": {"pos_margin": pos_margin, "neg_margin": 1.2, "squared": True}},
            "sampler": {"name": "random_pairs", "args": {"pos_per_class": 6, "neg_per_class": 6, "redraw_every": 5}},
            "miner": None}


RETR_D = _retr(0.7)
TRIPLET = {"criterion": {"name": "batch_hard_triplet", "args": {"margin": 0.1}},
           "sampler": {"name": "class_balanced", "args": {"classes_per_batch": 8, "images_per_class": 4, "batches_per_epoch": None}},
           "miner": None}
POOLINGS = {  # issue 16's heads, as docs/ablation.md screened them off the shelf
    "NetVLAD": {"name": "netvlad", "args": {"clusters": 16, "reduction_dim": 128, "alpha": 100.0}},
    "GeM + second order": {"name": "gem_second_order", "args": {"reduction_dim": 64, "iterations": 5, "centred": True}},
    "MOP": {"name": "mop", "args": {"levels": [1, 2, 3], "region_pooling": "gem"}},
    "multi-level": {"name": "multi_level", "args": {"stages": [2, 4], "channels": 1280, "pooling": "gem"}},  # starts as GeM
}
OBJECT_CROP = {"threshold": 0.2, "margin": 0.1}  # the threshold the postprocess stage tried on cub100's val
COUPLED_CLUSTERS = {"criterion": {"name": "coupled_clusters", "args": {"margin": 0.5}}, "miner": None}
MINED_POSITIVES = {**RETR_D, "sampler": {"name": "mined_positive_pairs", "args": {
    "pos_per_class": 6, "neg_per_class": 6, "redraw_every": 5, "clusters": 40, "threshold": 0.8, "max_mined_per_class": 6}}}
ROWS = [  # trained rows: the retrieval params (multi-similarity on P×K batches) with the row's differences
    Row("off-the-shelf", None),
    Row("off-the-shelf + free wins", "off-the-shelf", start="off-the-shelf", free_wins=True),
    Row("retr-s", "off-the-shelf", {"init": "imagenet", **_retr(0.0)}),
    Row("retr-d", "retr-s", {"init": "imagenet", **RETR_D}),
    Row("cls", "off-the-shelf", start="classifier"),
    Row("cls + retr-d", "cls", {"init": "classifier", **RETR_D}),
    Row("cls + triplet", "cls", {"init": "classifier", **TRIPLET}),
    Row("cls + MS", "cls", {"init": "classifier"}),
    Row("MS", "off-the-shelf", {"init": "imagenet"}),
    Row("cls + MS + free wins", "cls + MS", start="cls + MS", free_wins=True),
    Row("MS + free wins", "off-the-shelf + free wins", start="MS", free_wins=True),  # fine-tuning vs every free win
    *(Row(f"MS, {name}", "MS", {"init": "imagenet"}, model={"pooling": pooling}) for name, pooling in POOLINGS.items()),
    Row("off-the-shelf, object crops", "off-the-shelf", start="off-the-shelf", object_crop=OBJECT_CROP),
    Row("cls + MS, object crops", "cls + MS", start="cls + MS", object_crop=OBJECT_CROP),
    Row("cls + coupled clusters", "cls + MS", {"init": "classifier", **COUPLED_CLUSTERS}),
    Row("cls + retr-d + mined positives", "cls + retr-d", {"init": "classifier", **MINED_POSITIVES}),
    *(Row(f"cls + MS, {n} frozen stages", "cls + MS", {"init": "classifier"}, model={"frozen_stages": n}) for n in (3, 2)),
]


def row_params(params: Params, row: Row) -> Params:
    """The params a trained row runs with: its model and retrieval overrides applied, validated together (with the
    margin search off: a row trains its own params, and the search space is params.retrieval's)."""
    return with_overrides(params, {"model": row.model or {}, "retrieval": row.train or {}, "tune": {"search": "off"}})


def selected(names: list[str] | None) -> list[Row]:
    """The rows named (all when None) and every row they compare with or start from, in table order."""
    if not names:
        return list(ROWS)
    by_name = {r.name: r for r in ROWS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise FiresightError(f"no ablation row {', '.join(map(repr, unknown))} (rows: {', '.join(by_name)})")
    wanted, todo = set(), list(names)
    while todo:
        row = by_name[todo.pop()]
        if row.name not in wanted:
            wanted.add(row.name)
            todo += [n for n in (row.parent, row.start) if n in by_name]
    return [r for r in ROWS if r.name in wanted]


def run(params: Params, output: Path, rows: list[Row] = ROWS) -> list[dict]:
    if not (CLASSIFY_DIR / BEST_MODEL_FILE).is_file():
        raise FiresightError(f"{CLASSIFY_DIR / BEST_MODEL_FILE} is missing: run `dvc repro` first (the ablation uses its split and classifier)")
    splits = load_splits()
    models: dict[str, Path] = {}
    scores: dict[str, Scores] = {}
    results: list[dict] = []
    e = params.evaluate
    boot = (e.bootstrap.resamples, e.bootstrap.confidence, e.bootstrap.seed)
    workdir = Path(tempfile.mkdtemp(prefix="ablation-", dir="."))
    tracking.configure(params.tracking.uri, params.tracking.experiment)
    with tracking.stage_run("ablation", {"retrieval": params.retrieval.model_dump(mode="json")}, {"git_commit": git_commit()}):
        for row in rows:
            with tracking.mlflow.start_run(run_name=f"ablation: {row.name}", nested=True), stopwatch() as timing:
                model_dir = workdir / f"row{len(results)}"
                selection: dict = {}
                if row.train is not None:
                    own = row_params(params, row)
                    tracking.mlflow.log_params({f"{section}.{k}": json.dumps(v) for section, changes in
                                                (("model", row.model or {}), ("retrieval", row.train)) for k, v in changes.items()})
                    history, best = train_logged(train_retrieval, retrieval_job(own, own.retrieval, splits, starting_nets(own)),
                                                 "ablation", own, model_dir, select="val_map")
                    selection = {"best_epoch": int(best["epoch"]), "val_map_start": history[0]["val_map"],
                                 "val_map_last": history[-1]["val_map"], "val_map_best": best["val_map"]}
                net = load_net(model_dir / BEST_MODEL_FILE) if row.train is not None else _start(row, params, splits, models)
                if row.object_crop:
                    net.meta = {**net.meta, "object_crop": asdict(ObjectCrop(**row.object_crop))}
                if row.free_wins:
                    net, choice = search_model(net, row.name, params, splits, model_dir)
                    selection = {"recipe": choice.recipe.describe(), "val_map_start": choice.start_map,
                                 "val_map_best": choice.best_map}
                if (model_dir / BEST_MODEL_FILE).is_file():
                    models[row.name] = model_dir / BEST_MODEL_FILE
                scores[row.name] = test_scores(net, splits, params)
                summary = scores[row.name].summary(*boot)
                gain = scores[row.name].gain_over(scores[row.parent], *boot) if row.parent else None
            tracking.mlflow.log_metrics({"test_loo_map": summary["leave_one_out"]["map"]["value"],
                                         "test_firearm_map": summary["firearm"]["map"]["value"]})
            results.append({"row": row.name, "parent": row.parent, **summary, "gain_over_parent": gain, **selection,
                            **timing})
            loo = summary["leave_one_out"]["map"]
            say(f"firesight ablation: {row.name}: leave-one-out mAP {loo['value']:.4f} [{loo['lo']:.4f}, {loo['hi']:.4f}]"
                + (f", vs {row.parent} {format_gain(gain['leave_one_out']['map'])}" if gain else "")
                + f" ({timing['wall_seconds']:.0f} s)")
            _write(output, results, params)  # after every row: a run stopped late keeps the rows it finished
        shutil.rmtree(workdir, ignore_errors=True)
        tracking.mlflow.log_artifact(str(output))
    return results


def _write(output: Path, results: list[dict], params: Params) -> None:
    write_json(output.with_suffix(".json"), results)
    with atomic_write_path(output) as tmp:
        tmp.write_text(markdown_table(results, params))


def _start(row: Row, params: Params, splits: Splits, models: dict[str, Path]) -> RetrievalNet:
    """An untrained row's network: ImageNet's, the classifier, or an earlier row's."""
    if row.start in ("imagenet", "off-the-shelf"):
        return off_the_shelf(params, splits)
    if row.start == "classifier":
        return load_net(CLASSIFY_DIR / BEST_MODEL_FILE)
    return load_net(models[row.start])


def markdown_table(results: list[dict], params: Params) -> str:
    """One line per row: leave-one-out mAP, mAP@R and Recall@1 with their CIs, the Firearm protocol's mAP and CMC@1,
    the paired difference from the row's parent, and how the row's choice on val went."""
    conf = int(round(100 * params.evaluate.bootstrap.confidence))
    lines = [
        f"| method | LOO mAP [{conf}% CI] | LOO mAP@R | LOO R@1 | Firearm mAP [{conf}% CI] | Firearm CMC@1 | "
        f"LOO mAP vs parent (paired {conf}% CI) | val mAP: start → chosen (best epoch) | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        loo, firearm = r["leave_one_out"], r["firearm"]
        vs = "—" if not r.get("gain_over_parent") else f"{format_gain(r['gain_over_parent']['leave_one_out']['map'])} vs {r['parent']}"
        if "best_epoch" in r:
            val = f"{r['val_map_start']:.3f} → {r['val_map_best']:.3f} ({r['best_epoch']})"
        elif "recipe" in r:
            val = f"{r['val_map_start']:.3f} → {r['val_map_best']:.3f} ({r['recipe']})"
        else:
            val = "—"
        lines.append(f"| {r['row']} | {_ci(loo['map'])} | {loo['map@r']['value']:.4f} | {loo['recall@1']['value']:.3f} | "
                     f"{_ci(firearm['map'])} | {firearm['cmc@1']['value']:.3f} | {vs} | {val} | {r['wall_seconds']:.0f} |")
    m, rp = params.model, params.retrieval
    first = results[0]
    lines += [
        "",
        f"Test: leave-one-out over {first['leave_one_out']['queries']} images of unseen classes (each queries all the "
        f"others); Firearm protocol: {first['firearm']['queries']} queries against {first['firearm']['database']} "
        f"database images. CIs: {params.evaluate.bootstrap.resamples} bootstrap resamples of the test classes; a gain's "
        f"CI is paired (both rows on the same resampled classes). Backbone {m.backbone} ({m.weights}), {m.pooling_spec().name} pooling, "
        f"image size {m.image_size}, frozen stages {m.frozen_stages}; retrieval: {rp.epochs} epochs, lr {rp.lr}, "
        f"trunk cached: {rp.cache_frozen_trunk}; MS rows: {_described(rp.criterion)} on {_described(rp.sampler)}, miner "
        f"{_described(rp.miner) if rp.miner else None}; retr rows: {_described(RETR_D['criterion'])} (retr-s: m+ 0) on "
        f"{_described(RETR_D['sampler'])}; cls + triplet: "
        f"{_described(TRIPLET['criterion'])} on {_described(TRIPLET['sampler'])}; free wins: the postprocess stage's "
        f"choices on val (params `postprocess`). Git commit {git_commit()}.",
        "",
        "Each trained row keeps its best epoch by leave-one-out val mAP, epoch 0 (its starting point) included: a best "
        "epoch of 0 means fine-tuning never beat the start on validation, and the row then reports the starting "
        "model's test numbers.",
    ]
    return "\n".join(lines) + "\n"


def _ci(v: dict) -> str:
    return f"{v['value']:.4f} [{v['lo']:.4f}, {v['hi']:.4f}]"


def _described(named) -> str:
    """`name(k=v, ...)` of a {name, args} setting."""
    named = named if isinstance(named, dict) else named.model_dump()
    return f"{named['name']}({', '.join(f'{k}={v}' for k, v in named['args'].items())})"


def main(
    config: Path | None = typer.Option(None, "--config", help="an override file of params.yaml (e.g. configs/caltech101-ablation.yaml); "
                                "its split and classifier must be built"),
    output: Path = typer.Option(Path("docs/ablation.md"), help="markdown table (a .json beside it)"),
    row: list[str] = typer.Option(None, "--row", help="run only this row (repeatable) and the rows it compares with "
                                  "or starts from; default: every row"),
) -> None:
    log_file = route_output("ablation")  # Ray's and MLflow's records to logs/ablation.log; a line per row here
    try:
        run(load_params(DEFAULT_PARAMS, config), output, selected(row))
    except FiresightError as e:
        say(f"firesight ablation: error: {e}")
        raise typer.Exit(2) from None
    say(f"firesight ablation: wrote {output} and {output.with_suffix('.json')}" + (f" (log: {log_file})" if log_file else ""))


if __name__ == "__main__":
    typer.run(main)
