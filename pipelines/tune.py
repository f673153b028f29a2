"""Stage tune: Ray Tune search of retrieval params (`tune.space`: any `retrieval.*` paths; by default the double
margin's m+ and m−) by val mAP, each trial a Ray Train retrieval fine-tune from the best classifier; writes the
values the retrieval stage trains with.

    python -m pipelines.tune            # the same search as `dvc repro tune`, from params.yaml
"""

from __future__ import annotations

import math
import time

import mlflow
import pandas as pd

from components import tracking
from components.data.contract import Splits
from components.evaluation.plots import plot_search
from components.search_space import Point
from components.storage import atomic_write_path, write_json
from components.training.jobs import RetrievalJob
from components.training.retrieval import train_retrieval
from components.tuning import JobFactory, ParamSearch, TrialOutcome, best_trial, experiment_name, run_search
from pipelines._runner import run_stage
from pipelines.common import cluster, load_splits, params_dict
from pipelines.params import Params, TuneParams, search_space, unflatten, with_overrides
from pipelines.paths import BEST_PARAMS, METRICS_DIR, SEARCH_PLOT, TRIALS_TABLE
from pipelines.retrieval import retrieval_job, starting_nets

OUTCOME_COLUMNS = ["status", "epochs_run", "best_val_map", "best_epoch", "val_map_by_epoch", "error"]


def param_search(t: TuneParams) -> ParamSearch:
    return ParamSearch(t.search, search_space(t), t.num_trials, t.epochs_per_trial, t.max_concurrent_trials,
                       t.driver_cpus, t.asha.grace_period if t.asha.enabled else None, t.asha.reduction_factor, t.seed)


def job_factory(params: Params, splits: Splits) -> JobFactory:
    """The retrieval job of a point of the space: the retrieval params with the point's values."""
    nets = starting_nets(params)

    def job_for(point: Point) -> RetrievalJob:
        return retrieval_job(params, with_overrides(params.retrieval, unflatten(point).get("retrieval", {})), splits, nets)

    return job_for


def trials_table(outcomes: list[TrialOutcome], paths: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": o.trial_id, **o.point, "status": o.status, "epochs_run": o.epochs_run,
                          "best_val_map": o.best_val_map, "best_epoch": o.best_epoch,
                          "val_map_by_epoch": " ".join(f"{v:.4f}" for v in o.val_map_by_epoch), "error": o.error}
                         for o in outcomes], columns=["trial_id", *paths, *OUTCOME_COLUMNS])


def main(params: Params) -> None:
    t = params.tune
    paths = tuple(t.space)
    if t.search == "off":
        given = {path: _value_at(params, path) for path in paths}
        plot_search([], list(paths), given, SEARCH_PLOT, "no search (tune.search: off): the params given")
        _write({"overrides": {}, "source": "retrieval params (tune.search: off)"}, trials_table([], paths),
               {"search": "off", "trials": 0})
        return

    splits = load_splits()
    job_for = job_factory(params, splits)
    search = param_search(t)
    trial = cluster(params.ray, num_workers=t.workers_per_trial)
    name = experiment_name(job_for, search, trial)
    tracking.configure(params.tracking.uri, params.tracking.experiment)
    with tracking.stage_run("tune", params_dict(params, "tune", "retrieval", "ray"),
                            tags={"firesight.tune_experiment": name}, resume_tag="firesight.tune_experiment") as run:
        earlier = mlflow.get_run(run.info.run_id).data.metrics.get("search_wall_seconds", 0.0)  # before a restore
        start = time.perf_counter()
        try:
            outcomes = run_search(train_retrieval, job_for, search, cluster=trial, name=name,
                                  mlflow_parent=(params.tracking.experiment, run.info.run_id))
        finally:  # an interrupted invocation's time counts too
            timing = {"wall_seconds": round(time.perf_counter() - start, 1)}
            timing["search_wall_seconds"] = round(earlier + timing["wall_seconds"], 1)
            mlflow.log_metric("search_wall_seconds", timing["search_wall_seconds"])
        best = best_trial(outcomes)
        table = trials_table(outcomes, paths)
        grid = {path: list(d.values) for path, d in t.space.items()} if t.search == "grid" else None
        plot_search(table.to_dict("records"), list(paths), best.point, SEARCH_PLOT,
                    f"{t.search} search, {len(outcomes)} trials × ≤{t.epochs_per_trial} epochs: "
                    f"best val mAP {best.best_val_map:.4f}", grid)
        chosen = {"overrides": best.point, "val_map": best.best_val_map, "epoch": best.best_epoch,
                  "trial_id": best.trial_id, "experiment": name, "source": f"{t.search} search of {len(outcomes)} trials"}
        summary = {"search": t.search, "trials": len(outcomes), "best_val_map": best.best_val_map,
                   **{f"best_{path}": value for path, value in best.point.items()},
                   **{f"trials_{s.replace(' ', '_')}": int((table["status"] == s).sum())
                      for s in ("finished", "stopped early", "error")}}
        # metrics, not params: a restored search continues its parent run, where the choice may have been logged
        mlflow.log_metrics({"best_val_map": best.best_val_map,
                            **{f"best_{path}": float(v) for path, v in best.point.items() if _is_number(v)}})
        _write(chosen, table, summary | timing)
        mlflow.log_artifact(str(SEARCH_PLOT))
        mlflow.log_artifact(str(TRIALS_TABLE))
    for o in outcomes:
        if o.status == "error":
            print(f"firesight tune: trial {o.point} failed: {o.error}")
    print(table.drop(columns=["error"]).to_string(index=False, float_format=lambda v: "" if math.isnan(v) else f"{v:.4f}"))


def _value_at(params: Params, path: str):
    """The params value at a dotted path."""
    value = params
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _write(chosen: dict, table: pd.DataFrame, summary: dict) -> None:
    with atomic_write_path(TRIALS_TABLE) as tmp:
        table.to_csv(tmp, index=False)
    write_json(BEST_PARAMS, chosen)
    write_json(METRICS_DIR / "tune.json", summary)


if __name__ == "__main__":
    run_stage("tune", main)
