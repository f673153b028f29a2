"""Ray Tune integration: search any retrieval hyper-parameters by val mAP, each trial a Ray Train job.

A search space names params paths (`retrieval.lr`, `retrieval.criterion.args.pos_margin`, ...) with grid values or
random/optuna ranges. A trial is a driver function holding a fraction of a CPU: it builds the retrieval job for its
point of the space, launches it as a TorchTrainer fine-tune and relays the per-epoch val mAP to Tune through
`TuneReportCallback`; ASHA stops trials that trail at a rung. The experiment is named after everything that
determines its results, so an interrupted search with the same inputs is restored (finished trials are kept,
unfinished ones resume their Train run from its last checkpoint). The double margin's (m+, m−) is the
two-dimensional case: m− is declared `above` m+.
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
from components.search_space import Point, SearchSpace
from components.storage import arrow_filesystem, is_remote, remove_tree
from components.training.jobs import RetrievalJob

log = logging.getLogger(__name__)

METRIC = "val_map"
POINT = "point"  # a grid trial's config: {POINT: {path: value, ...}}; a searcher's: {path: value, ...}

JobFactory = Callable[[Point], RetrievalJob]  # the retrieval job with a point's values in place of the params'


@dataclass(frozen=True)
class ParamSearch:
    """What to search and how: `mode` grid (every point of the space's grid), random (uniform draws) or optuna
    (TPE): `num_trials` draws from the space's ranges."""

    mode: str
    space: SearchSpace
    num_trials: int
    epochs_per_trial: int
    max_concurrent_trials: int
    driver_cpus: float
    asha_grace_period: int | None  # None: no early stopping
    asha_reduction_factor: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("grid", "random", "optuna"):
            raise ValueError(f"unknown search mode {self.mode!r}; expected grid, random or optuna")
        self.space.check(self.mode)


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    point: Point
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


def reference_point(search: ParamSearch) -> Point:
    """A fixed point of the space (the first grid point, or the ranges' low corner): the job built for it stands
    for the search in its name."""
    return search.space.grid_points()[0] if search.mode == "grid" else search.space.range_corners()[0]


def experiment_name(job_for: JobFactory, search: ParamSearch, cluster: Cluster) -> str:
    """A name that changes with anything that changes the trials' results: the search, the job (data,
    optimisation, the starting checkpoint's bytes) whatever the searched paths' own params values, and the trial
    width."""
    job = job_for(reference_point(search))
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(search), dataclasses.asdict(job), cluster.num_workers],
                                       sort_keys=True, default=str).encode())
    if job.net.init_checkpoint:
        digest.update(Path(job.net.init_checkpoint).read_bytes())
    return f"search-{digest.hexdigest()[:12]}"


def run_search(loop: Callable[[RetrievalJob, Any], None], job_for: JobFactory, search: ParamSearch, *,
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
    trainable = tune.with_resources(
        tune.with_parameters(_trial, loop=loop, job_for=job_for, epochs=search.epochs_per_trial, cluster=trial_cluster,
                             experiment=name),
        {"CPU": search.driver_cpus})
    space, searcher, num_samples = _search_space(search)
    path = f"{storage}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=tune_filesystem):
        log.info("restoring search %s (finished trials are kept)", path)
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
        raise TrainingFailed(f"search {name} interrupted with {ended} of {len(saved)} trials ended; "
                             "run it again to resume (finished trials are kept)")
    outcomes = [_outcome(r, search) for r in results]
    for run in filesystem.get_file_info(FileSelector(storage)):  # the trials' Train runs (checkpoints), all ended
        if run.base_name.startswith(f"{name}-"):
            remove_tree(f"s3://{run.path}" if is_remote(cluster.storage_path) else run.path)
    if all(o.status == "error" for o in outcomes):
        raise TrainingFailed(f"all {len(outcomes)} search trials failed; first: {outcomes[0].error}")
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


def _trial(config: dict[str, Any], *, loop, job_for: JobFactory, epochs: int, cluster: Cluster, experiment: str) -> None:
    """One trial: a Ray Train retrieval fine-tune of the trial's point (for `epochs`, without re-measuring the start),
    reporting each epoch to Tune. Its Train run name is stable, so a restored trial resumes from its last epoch
    checkpoint."""
    run_name = f"{experiment}-{tune.get_context().get_trial_id()}"
    job = job_for(trial_point(config))
    job = dataclasses.replace(job, optim=dataclasses.replace(job.optim, epochs=epochs), measure_start=False)
    fit(torch_trainer(loop, job, run_name=run_name, cluster=cluster, callbacks=[TuneReportCallback()]), run_name)


def _search_space(search: ParamSearch) -> tuple[dict[str, Any], Any, int]:
    """Tune's param space, searcher and number of samples for the mode; every trial keeps the order."""
    if search.mode == "grid":
        return {POINT: tune.grid_search(search.space.grid_points())}, None, 1
    sampler = (optuna.samplers.RandomSampler(seed=search.seed) if search.mode == "random"
               else optuna.samplers.TPESampler(seed=search.seed))
    return {}, OptunaSearch(space=optuna_space(search), metric=METRIC, mode="max", sampler=sampler), search.num_trials


def optuna_space(search: ParamSearch) -> Callable[[optuna.Trial], None]:
    """Optuna define-by-run space over the ranges: a dimension that must be above another is drawn after it, from at
    least `gap` above its value (and the other's range is cut so that room remains)."""
    ordered = sorted(search.space.dimensions, key=lambda d: d.above is not None)
    ceiling = {d.above: d.high - d.gap for d in search.space.dimensions if d.above}

    def define_by_run(trial: optuna.Trial) -> None:
        for d in ordered:
            low, high = d.low, min(d.high, ceiling.get(d.path, math.inf))
            if d.above:
                low = max(low, trial.params[d.above] + d.gap)
            if d.integer:
                trial.suggest_int(d.path, math.ceil(low), math.floor(high), log=d.log)
            else:
                trial.suggest_float(d.path, low, high, log=d.log)

    return define_by_run


def _scheduler(search: ParamSearch) -> ASHAScheduler | None:
    if search.asha_grace_period is None:
        return None
    return ASHAScheduler(time_attr="epoch", max_t=search.epochs_per_trial, grace_period=search.asha_grace_period,
                         reduction_factor=search.asha_reduction_factor)


def _trial_name(trial) -> str:
    if POINT not in trial.config:  # a searcher's trial: its config is only known once the trial starts
        return f"trial_{trial.trial_id}"
    return " ".join(f"{path.rsplit('.', 1)[-1]}={value:g}" if isinstance(value, (int, float)) else f"{path}={value}"
                    for path, value in trial_point(trial.config).items())


def trial_point(config: dict[str, Any]) -> Point:
    """The params values of a trial's config: a grid point, or a searcher's draws."""
    return dict(config[POINT]) if POINT in config else dict(config)


def _outcome(result, search: ParamSearch) -> TrialOutcome:
    frame = result.metrics_dataframe
    rows = [] if frame is None or METRIC not in frame else frame.dropna(subset=[METRIC]).sort_values("epoch").to_dict("records")
    val_maps = [float(r[METRIC]) for r in rows]
    status = "error" if result.error else "finished" if len(rows) >= search.epochs_per_trial else "stopped early"
    error = "" if not result.error else root_cause(result.error)
    if not (config := result.config):  # a trial that never reported: its params.json, local or on S3
        with result.filesystem.open_input_stream(f"{result.path}/params.json") as f:
            config = json.loads(f.read())
    point = trial_point(config)
    return TrialOutcome(Path(result.path).name, {p: point[p] for p in search.space.paths}, status, len(rows), val_maps,
                        error)
