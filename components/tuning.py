"""Ray Tune integration: search the double-margin loss's margins (m+, m−), each trial a Ray Train job.

A trial is a driver function holding a fraction of a CPU: it launches a TorchTrainer retrieval fine-tune with its
margins and relays the per-epoch val mAP to Tune through `TuneReportCallback`; ASHA stops trials that trail at a
rung. The experiment is named after everything that determines its results, so an interrupted search with the same
inputs is restored (finished trials are kept, unfinished ones resume their Train run from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import ray.tune as tune
from pyarrow.fs import FileSelector
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from tqdm import tqdm

from components.distributed import Cluster, TrainingFailed, ensure_ray, fit, root_cause, torch_trainer
from components.storage import arrow_filesystem, is_remote, remove_tree
from components.losses.contrastive import with_margins
from components.training.jobs import RetrievalJob

log = logging.getLogger(__name__)

METRIC = "val_map"


@dataclass(frozen=True)
class MarginSearch:
    """What to search and how: `mode` grid (every m+ < m− pair of the two value lists), random (uniform draws) or
    optuna (TPE): `num_trials` draws from the two ranges with m− ≥ m+ + `min_gap`."""

    mode: str
    pos_values: tuple[float, ...]
    neg_values: tuple[float, ...]
    pos_range: tuple[float, float]
    neg_range: tuple[float, float]
    num_trials: int
    epochs_per_trial: int
    max_concurrent_trials: int
    driver_cpus: float
    asha_grace_period: int | None  # None: no early stopping
    asha_reduction_factor: float = 2.0
    seed: int = 0
    min_gap: float = 0.05

    def __post_init__(self) -> None:
        if self.mode not in ("grid", "random", "optuna"):
            raise ValueError(f"unknown search mode {self.mode!r}; expected grid, random or optuna")
        if self.mode == "grid" and not margin_grid(self.pos_values, self.neg_values):
            raise ValueError(f"no grid pair has m+ < m−: pos {list(self.pos_values)}, neg {list(self.neg_values)}")
        if self.mode != "grid" and self.pos_range[0] + self.min_gap > self.neg_range[1]:
            raise ValueError(f"pos range {list(self.pos_range)} and neg range {list(self.neg_range)} leave no m+ < m−")


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    pos_margin: float
    neg_margin: float
    status: str  # finished | stopped early | error
    epochs_run: int
    val_map_by_epoch: list[float]
    error: str = ""

    @property
    def best_val_map(self) -> float:
        return max(self.val_map_by_epoch, default=math.nan)

    @property
    def best_epoch(self) -> int:
        return 1 + self.val_map_by_epoch.index(self.best_val_map) if self.val_map_by_epoch else 0


def margin_grid(pos_values: tuple[float, ...], neg_values: tuple[float, ...]) -> list[tuple[float, float]]:
    """Every (m+, m−) of the two lists with m+ < m−, in list order."""
    return [(p, n) for p in pos_values for n in neg_values if p < n]


def experiment_name(job: RetrievalJob, search: MarginSearch, cluster: Cluster) -> str:
    """A name that changes with anything that changes the trials' results: the search, the job (data,
    optimisation, starting checkpoint's bytes) and the trial width."""
    job_fields = dataclasses.asdict(dataclasses.replace(job, criterion=with_margins(job.criterion, 0.0, 1.0)))
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(search), job_fields, cluster.num_workers], sort_keys=True,
                                       default=str).encode())
    if job.net.init_checkpoint:
        digest.update(Path(job.net.init_checkpoint).read_bytes())
    return f"margins-{digest.hexdigest()[:12]}"


def run_margin_search(loop: Callable[[RetrievalJob, Any], None], job: RetrievalJob, search: MarginSearch, *,
                      cluster: Cluster, name: str, mlflow_parent: tuple[str, str] | None = None) -> list[TrialOutcome]:
    """Run (or restore and finish) the search named `name`; return every trial's outcome.

    `cluster` is one trial's Train job (its workers and storage); `mlflow_parent`: see `search_callbacks`.
    """
    ensure_ray(cluster.address)
    filesystem, storage = arrow_filesystem(cluster.storage_path)  # a local folder (made absolute) or an s3:// prefix
    tune_filesystem = filesystem if is_remote(cluster.storage_path) else None  # Tune's own default for a folder
    # a trial holds exactly num_workers × cpus_per_worker CPUs: its driver's share comes out of its workers' reservation
    trial_cluster = dataclasses.replace(cluster,  # absolute: trials run in their own folders
                                        storage_path=cluster.storage_path if is_remote(cluster.storage_path) else storage,
                                        reserved_cpus_per_worker=cluster.cpus_per_worker - search.driver_cpus / cluster.num_workers)
    trial_job = dataclasses.replace(job, optim=dataclasses.replace(job.optim, epochs=search.epochs_per_trial),
                                    measure_start=False)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, loop=loop, job=trial_job, cluster=trial_cluster, experiment=name),
        {"CPU": search.driver_cpus})
    space, searcher, num_samples = _search_space(search)
    path = f"{storage}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=tune_filesystem):
        log.info("restoring margin search %s (finished trials are kept)", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, param_space=space, resume_unfinished=True,
                                   storage_filesystem=tune_filesystem)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=num_samples, search_alg=searcher,
                max_concurrent_trials=search.max_concurrent_trials, scheduler=_scheduler(search),
                trial_name_creator=_trial_name, trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name=name, storage_path=storage, storage_filesystem=tune_filesystem,
                                      callbacks=[_TrialsBar(), *search_callbacks(mlflow_parent)],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    results = tuner.fit()
    saved = tune.ExperimentAnalysis(path, storage_filesystem=tune_filesystem).trials  # a signal stops fit() early; the saved state tells
    ended = sum(t.status in ("TERMINATED", "ERROR") for t in saved)
    if ended < len(saved):
        raise TrainingFailed(f"margin search {name} interrupted with {ended} of {len(saved)} trials ended; "
                             "run it again to resume (finished trials are kept)")
    outcomes = [_outcome(r, search.epochs_per_trial) for r in results]
    for run in filesystem.get_file_info(FileSelector(storage)):  # the trials' Train runs (checkpoints), all ended
        if run.base_name.startswith(f"{name}-"):
            remove_tree(f"s3://{run.path}" if is_remote(cluster.storage_path) else run.path)
    if all(o.status == "error" for o in outcomes):
        raise TrainingFailed(f"all {len(outcomes)} margin-search trials failed; first: {outcomes[0].error}")
    return outcomes


class _TrialRunLogger(MLflowLoggerCallback):
    """Ray's MLflow logger that never holds the tracking URI, which may carry credentials, in its state (Tune
    pickles callbacks into tuner.pkl under the storage path): it takes MLflow's current URI when Tune sets it up in
    the driver, where `tracking.configure` set it."""

    def setup(self, *args: Any, **kwargs: Any) -> None:
        self.tracking_uri = mlflow.get_tracking_uri()  # Ray's default, None, would reset MLflow to its local store
        super().setup(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "tracking_uri": None}


def search_callbacks(mlflow_parent: tuple[str, str] | None) -> list[MLflowLoggerCallback]:
    """Tune's callbacks for a search: with `mlflow_parent` = (experiment, parent run id), each trial is an MLflow
    run nested under that parent, on MLflow's current tracking server."""
    if mlflow_parent is None:
        return []
    experiment, parent = mlflow_parent
    return [_TrialRunLogger(experiment_name=experiment,
                            tags={"mlflow.parentRunId": parent, "firesight.stage": "tune-trial"})]


class _TrialsBar(tune.Callback):
    """The search on the terminal (`sys.__stderr__`, as the training bars): trials ended of all, best val mAP so
    far. Read from Tune's trials at each step, so a restored search counts the trials it keeps."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        self.bar = tqdm(total=total_num_samples, desc="tune trials", unit="trial", file=sys.__stderr__)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        best = max((t.metric_analysis[METRIC]["max"] for t in trials if METRIC in t.metric_analysis), default=None)
        if best is not None:
            self.bar.set_postfix(best_val_map=f"{best:.4f}", refresh=False)
        if ended != self.bar.n:
            self.bar.update(ended - self.bar.n)

    def on_experiment_end(self, trials: list, **info) -> None:
        self.on_step_end(0, trials)
        self.bar.close()

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks into tuner.pkl; the bar is made in setup()
        return {**self.__dict__, "bar": None}


def best_trial(outcomes: list[TrialOutcome]) -> TrialOutcome:
    """The trial with the highest val mAP at any epoch (on ties the first created, whatever order a restored
    search returns its results in)."""
    scored = sorted((o for o in outcomes if o.val_map_by_epoch), key=lambda o: o.trial_id)
    return max(scored, key=lambda o: o.best_val_map)


def _trial(config: dict[str, Any], *, loop, job: RetrievalJob, cluster: Cluster, experiment: str) -> None:
    """One trial: a Ray Train retrieval fine-tune with the trial's margins, reporting each epoch to Tune. Its
    Train run name is stable, so a restored trial resumes from its last epoch checkpoint."""
    run_name = f"{experiment}-{tune.get_context().get_trial_id()}"
    pos, neg = trial_margins(config)
    job = dataclasses.replace(job, criterion=with_margins(job.criterion, pos, neg))
    fit(torch_trainer(loop, job, run_name=run_name, cluster=cluster, callbacks=[TuneReportCallback()]), run_name)


def _search_space(search: MarginSearch) -> tuple[dict[str, Any], Any, int]:
    """Tune's param space, searcher and number of samples for the mode; m+ < m− holds for every trial."""
    if search.mode == "grid":
        pairs = [list(pair) for pair in margin_grid(search.pos_values, search.neg_values)]
        return {"margins": tune.grid_search(pairs)}, None, 1
    sampler = (optuna.samplers.RandomSampler(seed=search.seed) if search.mode == "random"
               else optuna.samplers.TPESampler(seed=search.seed))
    return {}, OptunaSearch(space=margin_space(search), metric=METRIC, mode="max", sampler=sampler), search.num_trials


def margin_space(search: MarginSearch) -> Callable[[optuna.Trial], None]:
    """Optuna define-by-run space over the two ranges: m+ first, then m− drawn at least `min_gap` above it."""
    pos_lo, pos_hi = search.pos_range
    neg_lo, neg_hi = search.neg_range

    def define_by_run(trial: optuna.Trial) -> None:
        pos = trial.suggest_float("pos_margin", pos_lo, min(pos_hi, neg_hi - search.min_gap))
        trial.suggest_float("neg_margin", max(neg_lo, pos + search.min_gap), neg_hi)

    return define_by_run


def _scheduler(search: MarginSearch) -> ASHAScheduler | None:
    if search.asha_grace_period is None:
        return None
    return ASHAScheduler(time_attr="epoch", max_t=search.epochs_per_trial, grace_period=search.asha_grace_period,
                         reduction_factor=search.asha_reduction_factor)


def _trial_name(trial) -> str:
    if "margins" not in trial.config:  # a searcher's trial: its config is only known once the trial starts
        return f"trial_{trial.trial_id}"
    pos, neg = trial_margins(trial.config)
    return f"m+={pos:g} m-={neg:g}"


def trial_margins(config: dict[str, Any]) -> tuple[float, float]:
    """(m+, m−) of a trial's config: a grid pair, or a searcher's two draws."""
    pos, neg = config["margins"] if "margins" in config else (config["pos_margin"], config["neg_margin"])
    return float(pos), float(neg)


def _outcome(result, epochs: int) -> TrialOutcome:
    frame = result.metrics_dataframe
    rows = [] if frame is None or METRIC not in frame else frame.dropna(subset=[METRIC]).sort_values("epoch").to_dict("records")
    val_maps = [float(r[METRIC]) for r in rows]
    status = "error" if result.error else "finished" if len(rows) >= epochs else "stopped early"
    error = "" if not result.error else root_cause(result.error)
    if not (config := result.config):  # a trial that never reported: its params.json, local or on S3
        with result.filesystem.open_input_stream(f"{result.path}/params.json") as f:
            config = json.loads(f.read())
    return TrialOutcome(Path(result.path).name, *trial_margins(config), status, len(rows), val_maps, error)
