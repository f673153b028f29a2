"""Margin search: the space keeps m+ < m−, params are checked, the figure renders, and a real Ray Tune search
(trials are Ray Train jobs) reports a crashed trial, nests its MLflow runs and restores without rerunning."""

import json
import math
from pathlib import Path

import optuna
import pytest
import yaml

from components.evaluation.plots import plot_margin_search
from components.models.spec import NetSpec
from components.training.jobs import LabelledImages, Optimisation, RetrievalJob, RetrievalValSet
from pipelines.params import ParamsError, load_params
from tests.conftest import REPO, contrastive, random_pairs, tiny_sample
from tests.tune_loops import FAILING_POS_MARGIN

SEARCH_DEFAULTS = dict(pos_range=(0.0, 1.0), neg_range=(0.6, 1.6), num_trials=4, epochs_per_trial=1,
                       max_concurrent_trials=1, driver_cpus=0.25, asha_grace_period=None)


def _search(**changes):
    from components.tuning import MarginSearch

    return MarginSearch(**{"mode": "grid", "pos_values": (0.5,), "neg_values": (1.0,), **SEARCH_DEFAULTS, **changes})


def test_grid_keeps_only_pairs_with_pos_below_neg():
    from components.tuning import margin_grid

    assert margin_grid((0.2, 0.8, 1.2), (0.8, 1.2)) == [(0.2, 0.8), (0.2, 1.2), (0.8, 1.2)]
    with pytest.raises(ValueError, match="no grid pair"):
        _search(pos_values=(1.0,), neg_values=(0.5, 1.0))


@pytest.mark.parametrize("sampler", [optuna.samplers.RandomSampler(seed=1), optuna.samplers.TPESampler(seed=1)])
def test_drawn_margins_stay_ordered_and_in_range(sampler):
    from components.tuning import margin_space

    search = _search(mode="random", pos_range=(0.2, 1.4), neg_range=(0.8, 1.5))
    space = margin_space(search)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for _ in range(60):
        trial = study.ask()
        space(trial)
        pos, neg = trial.params["pos_margin"], trial.params["neg_margin"]
        assert 0.2 <= pos and neg <= 1.5 and neg >= pos + search.min_gap - 1e-9 and neg >= 0.8
        study.tell(trial, neg - pos)


def test_experiment_name_follows_what_changes_results(tmp_path):
    from components.distributed import Cluster
    from components.tuning import experiment_name

    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"classifier v1")
    job = RetrievalJob(net=NetSpec("a", "gem", 3.0, 64, None, 0, str(checkpoint)),
                       optim=Optimisation(1, 4, 0.01, 0.9, 0.0, 10, 0.1, (40, 48), True, 0),
                       train=LabelledImages(["x"], [0]), retrieval_val=RetrievalValSet(["y"], [0], [True]),
                       criterion=contrastive(0.5, 1.0), sampler=random_pairs(2, 2, 1))
    cluster = Cluster(1, 1)
    name = experiment_name(job, _search(), cluster)
    from dataclasses import replace
    assert experiment_name(replace(job, criterion=contrastive(0.1, 1.9)), _search(), cluster) == name
    assert experiment_name(job, _search(epochs_per_trial=2), cluster) != name
    assert experiment_name(job, _search(), Cluster(2, 1)) != name
    checkpoint.write_bytes(b"classifier v2")
    assert experiment_name(job, _search(), cluster) != name


def _params_file(tmp_path: Path, tune: dict, retrieval: dict | None = None) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tune"].update(tune)
    params["retrieval"].update(retrieval or {})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize("tune, retrieval, message", [
    ({"pos_margins": [1.2], "neg_margins": [1.0, 1.2]}, None, "tune: .*no grid pair has m\\+ < m−"),
    ({"neg_margins": [1.0, 2.5]}, None, "tune: .*neg_margins must lie in \\[0, 2\\]"),
    ({"search": "random", "pos_range": [1.5, 1.8], "neg_range": [0.5, 1.5]}, None, "leave no m\\+ < m−"),
    ({"neg_range": [1.6, 0.6]}, None, "neg_range must be \\[low, high\\]"),
    ({"epochs_per_trial": 1, "asha": {"enabled": True, "grace_period": 2, "reduction_factor": 2}}, None, "grace_period \\(2\\) exceeds"),
    ({"search": "bayes"}, None, "tune.search"),
    ({"driver_cpu": 0.5}, None, "tune.driver_cpu: unknown key"),
    ({}, {"criterion": {"name": "batch_hard_triplet", "args": {"margin": 0.1}},
          "sampler": {"name": "class_balanced", "args": {"classes_per_batch": 2, "images_per_class": 2}}},
     "retrieval.criterion is batch_hard_triplet; set tune.search: off"),
])
def test_bad_tune_params_are_named(tmp_path, tune, retrieval, message):
    with pytest.raises(ParamsError, match=message):
        load_params(_params_file(tmp_path, tune, retrieval))


def test_search_off_with_another_loss_is_valid(tmp_path):
    triplet = {"criterion": {"name": "batch_hard_triplet", "args": {"margin": 0.1}},
               "sampler": {"name": "class_balanced", "args": {"classes_per_batch": 2, "images_per_class": 2}}}
    assert load_params(_params_file(tmp_path, {"search": "off"}, triplet)).tune.search == "off"


def _trial(pos, neg, score, status="finished"):
    return {"pos_margin": pos, "neg_margin": neg, "best_val_map": score, "status": status}


@pytest.mark.parametrize("grid", [([0.3, 0.6, 1.0], [1.0, 1.4]), None])
def test_margin_figure_renders_grid_and_scatter(tmp_path, grid):
    trials = [_trial(0.3, 1.0, 0.71), _trial(0.3, 1.4, 0.74, "stopped early"), _trial(0.6, 1.0, 0.69),
              _trial(0.6, 1.4, math.nan, "error"), _trial(1.0, 1.4, 0.70)]
    path = tmp_path / "margins.png"
    plot_margin_search(trials, (0.3, 1.4), path, "test", grid)
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000


def test_margin_figure_without_trials_marks_the_given_margins(tmp_path):
    path = tmp_path / "margins.png"
    plot_margin_search([], (0.7, 1.2), path, "no search")
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("content, message", [
    (None, "not found; run the tune stage first"),
    ("{not json", "not a margins file"),
    (json.dumps({"pos_margin": 1.2, "neg_margin": 1.0}), "need 0 <= pos_margin < neg_margin"),
])
def test_retrieval_rejects_a_missing_or_bad_margins_file(tmp_path, monkeypatch, content, message):
    from components.errors import FiresightError
    from pipelines.paths import BEST_MARGINS
    from pipelines.retrieval import chosen_margins

    monkeypatch.chdir(tmp_path)
    if content is not None:
        BEST_MARGINS.parent.mkdir(parents=True)
        BEST_MARGINS.write_text(content)
    with pytest.raises(FiresightError, match=message):
        chosen_margins()


def _tiny_job(tmp_path: Path) -> RetrievalJob:
    rows = tiny_sample(tmp_path / "images", classes=4, per_class=6, max_side=48)
    names = sorted({label for _, label in rows})
    train = [(u, names.index(l)) for u, l in rows if names.index(l) < 2]
    val = [(u, names.index(l) - 2) for u, l in rows if names.index(l) >= 2]
    audit = tmp_path / "audit"
    audit.mkdir()
    return RetrievalJob(
        net=NetSpec("tf_efficientnet_lite0", "gem", 3.0, 48, None, frozen_stages=6),
        optim=Optimisation(3, 4, 0.01, 0.9, 0.0, 10, 0.1, (40, 48), True, 0),
        train=LabelledImages([u for u, _ in train], [l for _, l in train]),
        retrieval_val=RetrievalValSet([u for u, _ in val], [l for _, l in val], [i % 6 < 2 for i in range(len(val))]),
        criterion=contrastive(0.0, 1.0), sampler=random_pairs(2, 2, 1),
        audit_dir=str(audit))


@pytest.mark.slow
def test_search_reports_a_crashed_trial_nests_mlflow_runs_and_restores_without_rerunning(tmp_path, ray_local):
    import mlflow
    from mlflow import MlflowClient

    from components.distributed import Cluster
    from components.tuning import best_trial, run_margin_search
    from tests.tune_loops import recording_loop

    job = _tiny_job(tmp_path)
    audit = Path(job.audit_dir)
    search = _search(pos_values=(0.3, FAILING_POS_MARGIN), neg_values=(1.2,), max_concurrent_trials=2)
    cluster = Cluster(num_workers=1, cpus_per_worker=1, storage_path=str(tmp_path / "ray"))

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = mlflow.create_experiment("tune-test", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment_id, run_name="tune") as parent:
        outcomes = run_margin_search(recording_loop, job, search, cluster=cluster, name="search",
                                     mlflow_parent=("tune-test", parent.info.run_id))

    by_pos = {o.pos_margin: o for o in outcomes}
    assert sorted(by_pos) == [0.3, FAILING_POS_MARGIN]
    good, crashed = by_pos[0.3], by_pos[FAILING_POS_MARGIN]
    assert good.status == "finished" and good.epochs_run == 1 and 0 < good.best_val_map <= 1  # epochs_per_trial, not 3
    assert crashed.status == "error" and "injected crash" in crashed.error and crashed.val_map_by_epoch == []
    assert best_trial(outcomes) == good
    runs_log = (audit / "runs.log").read_text().splitlines()  # one line per start of a trial's Train workers
    assert runs_log.count("0.3 1.2") == 1 and set(runs_log) == {"0.3 1.2", f"{FAILING_POS_MARGIN} 1.2"}
    assert not list((tmp_path / "ray").glob("search-*")), "the trials' Train runs are removed once the search ended"

    client = MlflowClient(mlflow.get_tracking_uri())
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
    finished = next(r for r in children if r.info.status == "FINISHED")
    assert finished.data.params["margins"] == "[0.3, 1.2]"
    assert [m.value for m in client.get_metric_history(finished.info.run_id, "val_map")] == [good.best_val_map]

    restored = run_margin_search(recording_loop, job, search, cluster=cluster, name="search")
    assert (audit / "runs.log").read_text().splitlines() == runs_log, "a restored search reran a trial"
    assert sorted((o.pos_margin, o.status, o.best_val_map) for o in restored if o.status != "error") == \
        [(0.3, "finished", good.best_val_map)]


@pytest.mark.slow
def test_an_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path):
    import os
    import pickle
    import signal
    import subprocess
    import sys
    import time

    pickle_path = tmp_path / "job.pkl"
    pickle_path.write_bytes(pickle.dumps(_tiny_job(tmp_path)))
    runs_log = tmp_path / "audit" / "runs.log"
    command = [sys.executable, "-m", "tests.tune_loops", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    search = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (runs_log.exists() and "0.4 1.2" in runs_log.read_text()):  # trial 1 ended, trial 2 started
        assert search.poll() is None and time.monotonic() < deadline, "the search ended before it could be interrupted"
        time.sleep(0.5)
    search.send_signal(signal.SIGINT)
    _, stderr = search.communicate(timeout=300)
    assert search.returncode == 2 and "interrupted with 1 of 2 trials ended" in stderr, stderr[-3000:]

    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = runs_log.read_text().splitlines()
    assert runs.count("0.3 1.2") == 1, "the finished trial ran again"
    assert runs.count("0.4 1.2") == 2, "the interrupted trial did not resume"
