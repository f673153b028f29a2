"""What the training, index and evaluate stages share: paths of the file contract and job builders from params."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components import tracking
from components.distributed import Cluster, gpu_available, run_training
from components.data.contract import LABEL, ROLE, URI, Role, Splits, check_splits
from components.errors import FiresightError, WeightsError
from components.models.backbones import packaged_imagenet_file
from components.models.net import RetrievalNet, read_checkpoint
from components.models.spec import NetSpec
from components.storage import is_remote, read_parquet, write_json
from components.training.context import BEST_MODEL_FILE, HISTORY_FILE
from components.training.fit import initialise_pooling
from components.training.jobs import LabelledImages, Optimisation, RetrievalValSet
from pipelines.params import ModelParams, Params, RayParams, _TrainParams
from pipelines.paths import METRICS_DIR, SPLITS



def load_splits() -> Splits:
    """data/splits.parquet, checked against the contract; local paths made absolute (Ray workers may run elsewhere
    in the tree; s3:// URIs are read as they are)."""
    if not SPLITS.exists():
        raise FiresightError(f"{SPLITS}: no such file (run the split stage first)")
    splits = read_parquet(SPLITS)
    if URI in splits.columns:
        splits[URI] = [u if is_remote(u) else str(Path(u).resolve()) for u in splits[URI]]
    return check_splits(splits, str(SPLITS))


def labelled(rows: pd.DataFrame, classes: list[str]) -> LabelledImages:
    index = {c: i for i, c in enumerate(classes)}
    return LabelledImages(rows[URI].tolist(), [index[c] for c in rows[LABEL]])


def val_set(splits: Splits) -> RetrievalValSet:
    rows = splits.val_set()
    index = {c: i for i, c in enumerate(sorted(rows[LABEL].unique()))}
    return RetrievalValSet(rows[URI].tolist(), [index[c] for c in rows[LABEL]], (rows[ROLE] == Role.QUERY).tolist())


def optimisation(p: _TrainParams) -> Optimisation:
    return Optimisation(p.epochs, p.batch_size, p.lr, p.momentum, p.weight_decay, p.lr_step_epochs, p.lr_gamma,
                        tuple(p.train_max_side), p.hflip, p.seed, getattr(p, "head_lr_multiplier", 1.0),
                        p.rotation_degrees, p.color_jitter)


def off_the_shelf(params: Params, splits: Splits) -> RetrievalNet:
    """The ImageNet network with the configured pooling, never trained: a pooling that starts from data (NetVLAD's
    k-means centres) is initialised from the train classes' images, as training would start it."""
    net = net_spec(params.model).build().eval()
    train = splits.train_images()
    initialise_pooling(net, LabelledImages(train[URI].tolist(), [0] * len(train)), params.index.batch_size, seed=0)
    return net


def net_spec(m: ModelParams, init_checkpoint: Path | None = None) -> NetSpec:
    """The starting network; its weights file is checked here, before any Ray worker starts."""
    weights = None if m.weights == "none" else m.weights
    if weights == "imagenet":
        packaged_imagenet_file(m.backbone)
    elif weights is not None and not is_remote(weights):
        if not Path(weights).is_file():
            raise WeightsError(f"model.weights: file not found: {weights} (Firesight never downloads weights)")
        weights = str(Path(weights).resolve())  # Ray workers may run elsewhere in the tree
    pooling = m.pooling_spec()
    return NetSpec(m.backbone, pooling.name, m.gem_p, m.image_size, weights, m.frozen_stages,
                   str(init_checkpoint.resolve()) if init_checkpoint else None, dict(pooling.args) or None,
                   m.draft_decode)


def cluster(r: RayParams, num_workers: int | None = None) -> Cluster:
    """The Ray Train job shape of the ray params (`num_workers` replaces theirs, e.g. a search trial's width)."""
    return Cluster(num_workers or r.num_workers, r.cpus_per_worker, gpu_available(r.use_gpu), r.storage_path,
                   address=r.address)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def manifest_digest(manifest: pd.DataFrame) -> str:
    """Content hash of the data: sorted (sha256, label) pairs, independent of paths and row order."""
    rows = sorted(f"{i} {label}" for i, label in zip(manifest["id"], manifest["label"]))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    timing: dict[str, float] = {}
    start = time.perf_counter()
    yield timing
    timing["wall_seconds"] = round(time.perf_counter() - start, 1)


def params_dict(params: Params, *sections: str) -> dict:
    return {s: getattr(params, s).model_dump(mode="json") for s in sections}


def train_logged(loop: Callable, job: Any, name: str, params: Params, model_dir: Path,
                 select: str) -> tuple[list[dict], dict]:
    """Run a training loop as a Ray Train job on the params' cluster, writing `model_dir`; log its per-epoch history
    to the current MLflow run; return the history and its best epoch by `select` (the first best, as the loop's
    tracker keeps it)."""
    run_training(loop, job, name=name, cluster=cluster(params.ray), output_dir=model_dir)
    history = json.loads((model_dir / HISTORY_FILE).read_text())
    tracking.log_history(history)
    return history, max(history, key=lambda h: h[select])


def train_and_track(stage: str, loop: Callable, job: Any, params: Params, model_dir: Path, select: str,
                    extra_params: dict | None = None) -> dict:
    """Run a training loop as a Ray Train job inside an MLflow run; write model_dir/{best.pt, history.json,
    meta.json} and metrics/<stage>.json (best epoch, its val metrics, val mAP before training, wall time).
    `extra_params` are logged beside the params sections (values that come from elsewhere, e.g. tuned margins)."""
    tracking.configure(params.tracking.uri, params.tracking.experiment)
    with tracking.stage_run(stage, {**params_dict(params, "model", stage, "ray"), **(extra_params or {})}), \
            stopwatch() as timing:
        history, best = train_logged(loop, job, stage, params, model_dir, select)
        write_json(model_dir / "meta.json", read_checkpoint(model_dir / BEST_MODEL_FILE)["meta"])
        summary = {"best_epoch": int(best["epoch"]), **{k: v for k, v in best.items() if k.startswith("val_")},
                   "val_map_before_training": history[0]["val_map"]}
        tracking.mlflow.log_metrics({f"best_{k}": float(v) for k, v in summary.items()})
        tracking.mlflow.log_artifact(str(model_dir / BEST_MODEL_FILE), "model")
    summary.update(timing)
    write_json(METRICS_DIR / f"{stage}.json", summary)
    return summary
