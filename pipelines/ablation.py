"""The paper's ablation on the current split, in one command:

    python -m pipelines.ablation [--config configs/caltech101-ablation.yaml]   # after `dvc repro` (its split and classifier)

Rows: off-the-shelf ImageNet; retr-s (single margin, from ImageNet); retr-d (double margin, from ImageNet); cls;
cls + retr-d; cls + triplet; cls + retr-d + whitening + αQE. Each trained row is a Ray Train job with the
`retrieval` params of params.yaml (only the row's own differences applied). Writes docs/ablation.md and
docs/ablation.json, and one MLflow run per row nested under an `ablation` run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import typer

from components import tracking
from components.errors import FiresightError
from components.models.net import RetrievalNet, load_net
from components.storage import atomic_write_path, write_json
from components.training.context import BEST_MODEL_FILE
from components.training.retrieval import train_retrieval
from pipelines.common import git_commit, load_splits, net_spec, stopwatch, test_scores, train_logged
from pipelines.params import DEFAULT_PARAMS, Params, WhiteningParams, load_params, with_overrides
from pipelines.paths import CLASSIFY_DIR
from pipelines.retrieval import retrieval_job, starting_nets, whitening_step

log = logging.getLogger("ablation")


@dataclass(frozen=True)
class Row:
    name: str
    train: dict | None = None  # retrieval-params overrides of a trained row (`with_overrides`); None: no training
    start: str = "imagenet"  # imagenet | classifier | <name of an earlier row> (no training, post-processing only)
    whitening: bool = False
    qe: bool = False


TRIPLET = {"criterion": {"name": "batch_hard_triplet", "args": {"margin": 0.1}},
           "sampler": {"name": "class_balanced", "args": {"classes_per_batch": 8, "images_per_class": 4}}}
ROWS = [  # the retrieval params' double-margin criterion and sampler unless a row replaces them
    Row("off-the-shelf"),
    Row("retr-s", {"init": "imagenet", "criterion": {"args": {"pos_margin": 0.0}}}),
    Row("retr-d", {"init": "imagenet"}),
    Row("cls", start="classifier"),
    Row("cls + retr-d", {"init": "classifier"}),
    Row("cls + triplet", {"init": "classifier", **TRIPLET}),
    Row("cls + retr-d + whitening + αQE", start="cls + retr-d", whitening=True, qe=True),
]


def run(params: Params, output: Path, qe_k: int, qe_alpha: float) -> list[dict]:
    if not (CLASSIFY_DIR / BEST_MODEL_FILE).is_file():
        raise FiresightError(f"{CLASSIFY_DIR / BEST_MODEL_FILE} is missing: run `dvc repro` first (the ablation uses its split and classifier)")
    splits = load_splits()
    models: dict[str, Path] = {}
    results: list[dict] = []
    workdir = Path(tempfile.mkdtemp(prefix="ablation-", dir="."))
    tracking.configure(params.tracking.uri, params.tracking.experiment)
    with tracking.stage_run("ablation", {"retrieval": params.retrieval.model_dump(mode="json"), "qe_k": qe_k, "qe_alpha": qe_alpha},
                            {"git_commit": git_commit()}):
        for row in ROWS:
            with tracking.mlflow.start_run(run_name=f"ablation: {row.name}", nested=True), stopwatch() as timing:
                model_dir = workdir / f"row{len(results)}"
                selection = {}
                if row.train is not None:
                    p = with_overrides(params.retrieval, row.train)
                    tracking.mlflow.log_params({f"retrieval.{k}": json.dumps(v) for k, v in row.train.items()})
                    history, best = train_logged(train_retrieval, retrieval_job(params, p, splits, starting_nets(params)),
                                                 "ablation", params, model_dir, select="val_map")
                    selection = {"best_epoch": int(best["epoch"]), "val_map_start": history[0]["val_map"],
                                 "val_map_last": history[-1]["val_map"], "val_map_best": best["val_map"]}
                elif row.start in models:
                    shutil.copytree(models[row.start].parent, model_dir)
                    if row.whitening:
                        whitening_step(params, params.retrieval.model_copy(update={"whitening": WhiteningParams(enabled=True)}), splits)(model_dir)
                models[row.name] = model_dir / BEST_MODEL_FILE
                metrics, _, _ = test_scores(_net(row, params, models), splits, params, qe_k if row.qe else 0, qe_alpha,
                                            desc=row.name)
            tracking.mlflow.log_metrics({f"test_{k.replace('@', '_at_')}": float(v) for k, v in metrics.items()})
            results.append({"row": row.name, **metrics, **selection, **timing})
            log.info("%s: mAP %.4f, CMC@1 %.4f (%.0f s)", row.name, metrics["map"], metrics["cmc@1"], timing["wall_seconds"])
        shutil.rmtree(workdir, ignore_errors=True)
        write_json(output.with_suffix(".json"), results)
        with atomic_write_path(output) as tmp:
            tmp.write_text(markdown_table(results, params, qe_k, qe_alpha))
        tracking.mlflow.log_artifact(str(output))
    return results


def _net(row: Row, params: Params, models: dict[str, Path]) -> RetrievalNet:
    if row.train is None and row.start == "imagenet":
        return net_spec(params.model).build().eval()
    if row.start == "classifier" and row.train is None:
        return load_net(CLASSIFY_DIR / BEST_MODEL_FILE)
    return load_net(models[row.name])


def markdown_table(results: list[dict], params: Params, qe_k: int, qe_alpha: float) -> str:
    base = results[0]["map"]
    ranks = params.evaluate.cmc_ranks
    lines = [
        f"| method | test mAP | {' | '.join(f'CMC@{k}' for k in ranks)} | mAP vs off-the-shelf | val mAP: start → last (best epoch) | wall time (s) |",
        "|---|---|" + "---|" * len(ranks) + "---|---|---|",
    ]
    for r in results:
        rel = "—" if r is results[0] else f"{100 * (r['map'] - base) / base:+.1f}%"
        cmc = " | ".join(f"{r[f'cmc@{k}']:.3f}" for k in ranks)
        val = f"{r['val_map_start']:.3f} → {r['val_map_last']:.3f} ({r['best_epoch']})" if "best_epoch" in r else "—"
        lines.append(f"| {r['row']} | {r['map']:.4f} | {cmc} | {rel} | {val} | {r['wall_seconds']:.0f} |")
    m, rp = params.model, params.retrieval
    lines += [
        "",
        f"Test: {results[0]['queries']} queries against {results[0]['database']} database images of unseen classes. "
        f"Backbone {m.backbone} ({m.weights}), {m.pooling} pooling, image size {m.image_size}, frozen stages {m.frozen_stages}; "
        f"retrieval: {rp.epochs} epochs, lr {rp.lr}, {_described(rp.criterion)} (retr-s: m+ 0) on {_described(rp.sampler)}; "
        f"cls + triplet: {_described(TRIPLET['criterion'])} on {_described(TRIPLET['sampler'])}; "
        f"whitening learned on the train classes; αQE k={qe_k}, α={qe_alpha}. Git commit {git_commit()}.",
        "",
        "Each trained row keeps its best epoch by val mAP on the val classes, epoch 0 (its starting point) included: "
        "a best epoch of 0 means fine-tuning never beat the start on validation, and the row then reports the "
        "starting model's test numbers.",
    ]
    return "\n".join(lines) + "\n"


def _described(named) -> str:
    """`name(k=v, ...)` of a {name, args} setting."""
    named = named if isinstance(named, dict) else named.model_dump()
    return f"{named['name']}({', '.join(f'{k}={v}' for k, v in named['args'].items())})"


def main(
    config: Path | None = typer.Option(None, "--config", help="an override file of params.yaml (e.g. configs/caltech101-ablation.yaml); "
                                "its split and classifier must be built"),
    output: Path = typer.Option(Path("docs/ablation.md"), help="markdown table (a .json beside it)"),
    qe_k: int = typer.Option(5, help="αQE neighbours for the last row"),
    qe_alpha: float = typer.Option(3.0, help="αQE exponent"),
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s ablation %(levelname)s %(message)s")
    try:
        run(load_params(DEFAULT_PARAMS, config), output, qe_k, qe_alpha)
    except FiresightError as e:
        typer.echo(f"firesight ablation: error: {e}", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    typer.run(main)
