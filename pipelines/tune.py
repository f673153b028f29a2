"""Stage tune: Ray Tune search of the double-margin loss's (m+, m−) by val mAP, each trial a Ray Train retrieval
fine-tune from the best classifier; writes the margins the retrieval stage uses.

    python -m pipelines.tune            # the same search as `dvc repro tune`, from params.yaml
"""

from __future__ import annotations

import math
import time

import mlflow
import pandas as pd

from components import tracking
from components.distributed import Cluster, gpu_available
from components.evaluation.plots import plot_margin_search
from components.storage import atomic_write_path, write_json
from components.training.retrieval import train_retrieval
from components.tuning import MarginSearch, TrialOutcome, best_trial, experiment_name, run_margin_search
from pipelines._runner import run_stage
from pipelines.common import load_splits, params_dict
from pipelines.params import MIN_MARGIN_GAP, Params, TuneParams
from pipelines.paths import BEST_MARGINS, MARGIN_PLOT, METRICS_DIR, TRIALS_TABLE
from pipelines.retrieval import retrieval_job


def margin_search(t: TuneParams) -> MarginSearch:
    return MarginSearch(t.search, tuple(t.pos_margins), tuple(t.neg_margins), tuple(t.pos_range), tuple(t.neg_range),
                        t.num_trials, t.epochs_per_trial, t.max_concurrent_trials, t.driver_cpus,
                        t.asha.grace_period if t.asha.enabled else None, t.asha.reduction_factor, t.seed, MIN_MARGIN_GAP)


def trials_table(outcomes: list[TrialOutcome]) -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": o.trial_id, "pos_margin": o.pos_margin, "neg_margin": o.neg_margin,
                          "status": o.status, "epochs_run": o.epochs_run, "best_val_map": o.best_val_map,
                          "best_epoch": o.best_epoch, "val_map_by_epoch": " ".join(f"{v:.4f}" for v in o.val_map_by_epoch),
                          "error": o.error} for o in outcomes],
                        columns=["trial_id", "pos_margin", "neg_margin", "status", "epochs_run", "best_val_map",
                                 "best_epoch", "val_map_by_epoch", "error"])


def main(params: Params) -> None:
    t, p = params.tune, params.retrieval
    if t.search == "off":
        chosen: dict = {"source": "retrieval params (tune.search: off)"}
        margins = None
        if p.criterion.name == "double_margin_contrastive":
            margins = (p.criterion.args.pos_margin, p.criterion.args.neg_margin)
            chosen = {"pos_margin": margins[0], "neg_margin": margins[1], **chosen}
        table = trials_table([])
        plot_margin_search([], margins, MARGIN_PLOT, "no search (tune.search: off): the margins given" if margins
                           else f"no search (tune.search: off): {p.criterion.name} has no margins")
        _write(chosen, table, {"search": "off", "trials": 0})
        return

    splits = load_splits()
    job = retrieval_job(params, p, splits)
    search = margin_search(t)
    cluster = Cluster(t.workers_per_trial, params.ray.cpus_per_worker, gpu_available(params.ray.use_gpu),
                      params.ray.storage_path, address=params.ray.address)
    name = experiment_name(job, search, cluster)
    tracking.configure(params.tracking.uri, params.tracking.experiment)
    with tracking.stage_run("tune", params_dict(params, "tune", "retrieval", "ray"),
                            tags={"firesight.tune_experiment": name}, resume_tag="firesight.tune_experiment") as run:
        earlier = mlflow.get_run(run.info.run_id).data.metrics.get("search_wall_seconds", 0.0)  # before a restore
        start = time.perf_counter()
        try:
            outcomes = run_margin_search(train_retrieval, job, search, cluster=cluster, name=name,
                                         mlflow_parent=(params.tracking.experiment, run.info.run_id))
        finally:  # an interrupted invocation's time counts too
            timing = {"wall_seconds": round(time.perf_counter() - start, 1)}
            timing["search_wall_seconds"] = round(earlier + timing["wall_seconds"], 1)
            mlflow.log_metric("search_wall_seconds", timing["search_wall_seconds"])
        best = best_trial(outcomes)
        table = trials_table(outcomes)
        grid = (t.pos_margins, t.neg_margins) if t.search == "grid" else None
        plot_margin_search(table.to_dict("records"), (best.pos_margin, best.neg_margin), MARGIN_PLOT,
                           f"{t.search} search, {len(outcomes)} trials × ≤{t.epochs_per_trial} epochs: "
                           f"best val mAP {best.best_val_map:.4f}", grid)
        chosen = {"pos_margin": best.pos_margin, "neg_margin": best.neg_margin, "val_map": best.best_val_map,
                  "epoch": best.best_epoch, "trial_id": best.trial_id, "experiment": name,
                  "source": f"{t.search} search of {len(outcomes)} trials"}
        summary = {"search": t.search, "trials": len(outcomes), "best_val_map": best.best_val_map,
                   "best_pos_margin": best.pos_margin, "best_neg_margin": best.neg_margin,
                   **{f"trials_{s.replace(' ', '_')}": int((table["status"] == s).sum())
                      for s in ("finished", "stopped early", "error")}}
        # metrics, not params: a restored search continues its parent run, where the choice may have been logged
        mlflow.log_metrics({"best_pos_margin": best.pos_margin, "best_neg_margin": best.neg_margin,
                            "best_val_map": best.best_val_map})
        _write(chosen, table, summary | timing)
        mlflow.log_artifact(str(MARGIN_PLOT))
        mlflow.log_artifact(str(TRIALS_TABLE))
    for o in outcomes:
        if o.status == "error":
            print(f"firesight tune: trial m+={o.pos_margin:g} m-={o.neg_margin:g} failed: {o.error}")
    print(table.drop(columns=["error"]).to_string(index=False, float_format=lambda v: "" if math.isnan(v) else f"{v:.4f}"))


def _write(chosen: dict, table: pd.DataFrame, summary: dict) -> None:
    with atomic_write_path(TRIALS_TABLE) as tmp:
        table.to_csv(tmp, index=False)
    write_json(BEST_MARGINS, chosen)
    write_json(METRICS_DIR / "tune.json", summary)


if __name__ == "__main__":
    run_stage("tune", main)
