"""Margin search: the space keeps m+ < m−, params are checked, the figure renders, and a real Ray Tune search
(trials are Ray Train jobs) reports a crashed trial, nests its MLflow runs and restores without rerunning."""

import json
import math
from pathlib import Path

import optuna
import pytest
import yaml

from components.evaluation.plots import plot_search
from components.models.spec import NetSpec
from components.training.jobs import LabelledImages, Optimisation, RetrievalJob, RetrievalValSet
from pipelines.params import ParamsError, load_params
from tests.conftest import REPO, contrastive, random_pairs, tiny_sample
from tests.tune_loops import FAILING_POS_MARGIN, NEG, POS, WithMargins, margin_grid

def _space(pos=(0.5,), neg=(1.0,), pos_range=(0.0, 1.0), neg_range=(0.6, 1.6)):
    from components.search_space import Dimension, SearchSpace

    return SearchSpace((Dimension(POS, pos, *pos_range), Dimension(NEG, neg, *neg_range, above=POS, gap=0.05)))


def _search(mode="grid", space=None, **changes):
    from components.tuning import ParamSearch

    return ParamSearch(**{"mode": mode, "space": space or _space(), "num_trials": 4, "epochs_per_trial": 1,
                          "max_concurrent_trials": 1, "driver_cpus": 0.25, "asha_grace_period": None, **changes})


def test_grid_keeps_only_points_above_what_they_must_exceed():
    assert [(p[POS], p[NEG]) for p in _space((0.2, 0.8, 1.2), (0.8, 1.2)).grid_points()] == \
        [(0.2, 0.8), (0.2, 1.2), (0.8, 1.2)]
    with pytest.raises(ValueError, match="no grid point"):
        _search(space=_space((1.0,), (0.5, 1.0)))


@pytest.mark.parametrize("sampler", [optuna.samplers.RandomSampler(seed=1), optuna.samplers.TPESampler(seed=1)])
def test_drawn_points_stay_ordered_and_in_range(sampler):
    from components.tuning import optuna_space

    search = _search("random", _space(pos_range=(0.2, 1.4), neg_range=(0.8, 1.5)))
    space = optuna_space(search)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for _ in range(60):
        trial = study.ask()
        space(trial)
        pos, neg = trial.params[POS], trial.params[NEG]
        assert 0.2 <= pos and neg <= 1.5 and neg >= pos + 0.05 - 1e-9 and neg >= 0.8
        study.tell(trial, neg - pos)


def test_a_space_of_any_params_draws_integers_and_log_scales():
    from components.search_space import Dimension, SearchSpace
    from components.tuning import optuna_space

    space = SearchSpace((Dimension("retrieval.lr", (1e-3,), 1e-4, 1e-1, log=True),
                         Dimension("retrieval.sampler.args.pos_per_class", (4,), 2, 9, integer=True)))
    define = optuna_space(_search("optuna", space))
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        define(trial)
        assert 1e-4 <= trial.params["retrieval.lr"] <= 1e-1
        assert isinstance(trial.params["retrieval.sampler.args.pos_per_class"], int)
        study.tell(trial, 0.0)
    assert len({round(t.params["retrieval.lr"], 6) for t in study.trials}) > 20


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
    name = experiment_name(WithMargins(job), _search(), cluster)
    from dataclasses import replace
    # the searched params' own values do not matter (every trial replaces them); everything else does
    assert experiment_name(WithMargins(replace(job, criterion=contrastive(0.1, 1.9))), _search(), cluster) == name
    assert experiment_name(WithMargins(replace(job, sampler=random_pairs(3, 3, 1))), _search(), cluster) != name
    assert experiment_name(WithMargins(job), _search(epochs_per_trial=2), cluster) != name
    assert experiment_name(WithMargins(job), _search(space=_space(pos=(0.4,))), cluster) != name
    assert experiment_name(WithMargins(job), _search(), Cluster(2, 1)) != name
    checkpoint.write_bytes(b"classifier v2")
    assert experiment_name(WithMargins(job), _search(), cluster) != name


RETR_D = {"criterion": {"name": "double_margin_contrastive", "args": {"pos_margin": 0.7, "neg_margin": 1.2, "squared": True}},
          "sampler": {"name": "random_pairs", "args": {"pos_per_class": 6, "neg_per_class": 6, "redraw_every": 5}},
          "miner": None}  # the margins these tests search


def _params_file(tmp_path: Path, tune: dict, retrieval: dict | None = None, model: dict | None = None) -> Path:
    """params.yaml with DeepFirearm's double-margin retrieval, then the changes given."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tune"].update(tune)
    params["retrieval"].update({**RETR_D, **(retrieval or {})})
    params["model"].update(model or {})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _dim(values, range_, above=None):
    return {"values": values, "range": range_, "log": False, "integer": False,
            "above": {"path": above, "gap": 0.05} if above else None}


def _margins(pos=(0.5,), neg=(1.0, 1.2), pos_range=(0.0, 1.0), neg_range=(0.6, 1.6)):
    return {"space": {POS: _dim(list(pos), list(pos_range)), NEG: _dim(list(neg), list(neg_range), POS)}}


@pytest.mark.parametrize("tune, retrieval, message", [
    (_margins(pos=(1.2,), neg=(1.0, 1.2)), None, "tune.space: no grid point keeps each path above"),
    (_margins(neg=(1.0, 2.5)), None, "the point .*neg_margin': 2.5.* does not fit retrieval: .*neg_margin"),
    ({"search": "random", **_margins(pos_range=(1.5, 1.8), neg_range=(0.5, 1.5))}, None, "the ranges leave no point"),
    (_margins(neg_range=(1.6, 0.6)), None, "range must be \\[low, high\\]"),
    ({"space": {"model.image_size": _dim([64], None)}}, None, "only retrieval.\\* paths can be searched"),
    ({"space": {"retrieval.lrr": _dim([0.1], None)}}, None, "tune.space: the point .*retrieval.lrr.* does not fit retrieval: .*lrr: unknown key"),
    ({"search": "optuna", "space": {"retrieval.lr": _dim([0.1], None)}}, None, "needs its range"),
    ({"epochs_per_trial": 1, "asha": {"enabled": True, "grace_period": 2, "reduction_factor": 2}}, None, "grace_period \\(2\\) exceeds"),
    ({"search": "bayes"}, None, "tune.search"),
    ({"driver_cpu": 0.5}, None, "tune.driver_cpu: unknown key"),
    (_margins(), {"criterion": {"name": "batch_hard_triplet", "args": {"margin": 0.1}},
          "sampler": {"name": "class_balanced", "args": {"classes_per_batch": 2, "images_per_class": 2, "batches_per_epoch": None}}},
     "does not fit retrieval: .*criterion.batch_hard_triplet.args.pos_margin: unknown key"),
])
def test_bad_tune_params_are_named(tmp_path, tune, retrieval, message):
    with pytest.raises(ParamsError, match=message):
        load_params(_params_file(tmp_path, tune, retrieval))


def test_search_off_with_another_loss_is_valid(tmp_path):
    triplet = {"criterion": {"name": "batch_hard_triplet", "args": {"margin": 0.1}},
               "sampler": {"name": "class_balanced", "args": {"classes_per_batch": 2, "images_per_class": 2, "batches_per_epoch": None}}}
    assert load_params(_params_file(tmp_path, {"search": "off"}, triplet)).tune.search == "off"


def test_any_retrieval_param_can_be_searched_and_reaches_the_job(tmp_path):
    from components.data.contract import check_splits
    from components.data.splits import split_classes
    from pipelines.tune import job_factory, param_search

    space = {"retrieval.lr": _dim([0.001, 0.01], [0.0001, 0.1]),
             "retrieval.sampler.args.pos_per_class": {**_dim([2, 4], [2, 8]), "integer": True}}
    params = load_params(_params_file(tmp_path, {"search": "grid", "space": space}))
    rows = [{"id": f"{c}{i}", "label": f"c{c}", "uri": f"/x/{c}/{i}.jpg"} for c in range(10) for i in range(8)]
    import pandas as pd
    splits = check_splits(split_classes(pd.DataFrame(rows), seed=0, class_ratio=(6, 2, 2), val_classes=None,
                                        test_classes=None, queries_per_class=2, classifier_train_fraction=0.7,
                                        min_images_per_class=6).splits, "splits")
    search = param_search(params.tune)
    assert len(search.space.grid_points()) == 4
    job = job_factory(params, splits)({"retrieval.lr": 0.01, "retrieval.sampler.args.pos_per_class": 4})
    assert job.optim.lr == 0.01 and job.sampler.args["pos_per_class"] == 4
    assert job.criterion == params.retrieval.criterion.spec() and job.optim.epochs == params.retrieval.epochs


def _trial(pos, neg, score, status="finished"):
    return {POS: pos, NEG: neg, "best_val_map": score, "status": status}


@pytest.mark.parametrize("grid", [{POS: [0.3, 0.6, 1.0], NEG: [1.0, 1.4]}, None])
def test_search_figure_renders_grid_and_scatter(tmp_path, grid):
    trials = [_trial(0.3, 1.0, 0.71), _trial(0.3, 1.4, 0.74, "stopped early"), _trial(0.6, 1.0, 0.69),
              _trial(0.6, 1.4, math.nan, "error"), _trial(1.0, 1.4, 0.70)]
    path = tmp_path / "search.png"
    plot_search(trials, [POS, NEG], {POS: 0.3, NEG: 1.4}, path, "test", grid)
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000


def test_search_figure_of_one_param_and_of_none_run(tmp_path):
    path = tmp_path / "search.png"
    plot_search([{"retrieval.lr": lr, "best_val_map": v, "status": "finished"} for lr, v in ((0.001, 0.5), (0.01, 0.6))],
                ["retrieval.lr"], {"retrieval.lr": 0.01}, path, "lr")
    assert path.read_bytes()[:4] == b"\x89PNG"
    plot_search([], [POS, NEG], {POS: 0.7, NEG: 1.2}, path, "no search")
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("content, message", [
    (None, "not found; run the tune stage first"),
    ("{not json", "not a tune choice"),
    (json.dumps({"overrides": {"model.image_size": 64}}), "overrides must map retrieval.\\* paths"),
])
def test_retrieval_rejects_a_missing_or_bad_choice_file(tmp_path, monkeypatch, content, message):
    from components.errors import FiresightError
    from pipelines.paths import BEST_PARAMS
    from pipelines.retrieval import chosen_overrides

    monkeypatch.chdir(tmp_path)
    if content is not None:
        BEST_PARAMS.parent.mkdir(parents=True)
        BEST_PARAMS.write_text(content)
    with pytest.raises(FiresightError, match=message):
        chosen_overrides()


def _tiny_job(tmp_path: Path) -> RetrievalJob:
    rows = tiny_sample(tmp_path / "images", classes=4, per_class=6, max_side=48)
    names = sorted({label for _, label in rows})
    train = [(u, names.index(l)) for u, l in rows if names.index(l) < 2]
    val = [(u, names.index(l) - 2) for u, l in rows if names.index(l) >= 2]
    return RetrievalJob(
        net=NetSpec("tf_efficientnet_lite0", "gem", 3.0, 48, None, frozen_stages=6),
        optim=Optimisation(3, 4, 0.01, 0.9, 0.0, 10, 0.1, (40, 48), True, 0),
        train=LabelledImages([u for u, _ in train], [l for _, l in train]),
        retrieval_val=RetrievalValSet([u for u, _ in val], [l for _, l in val], [i % 6 < 2 for i in range(len(val))]),
        criterion=contrastive(0.0, 1.0), sampler=random_pairs(2, 2, 1))


@pytest.mark.slow
def test_search_reports_a_crashed_trial_nests_mlflow_runs_and_restores_without_rerunning(tmp_path, ray_local):
    import mlflow
    from mlflow import MlflowClient

    from components.distributed import Cluster
    from components.tuning import best_trial, run_search
    from tests.tune_loops import recording_loop

    job_for = WithMargins(_tiny_job(tmp_path))
    search = margin_grid((0.3, FAILING_POS_MARGIN), (1.2,), concurrent=2)
    cluster = Cluster(num_workers=1, cpus_per_worker=1, storage_path=str(tmp_path / "ray"))

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = mlflow.create_experiment("tune-test", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment_id, run_name="tune") as parent:
        outcomes = run_search(recording_loop, job_for, search, cluster=cluster, name="search",
                              mlflow_parent=("tune-test", parent.info.run_id))

    by_pos = {o.point[POS]: o for o in outcomes}
    assert sorted(by_pos) == [0.3, FAILING_POS_MARGIN] and all(o.point[NEG] == 1.2 for o in outcomes)
    good, crashed = by_pos[0.3], by_pos[FAILING_POS_MARGIN]
    assert good.status == "finished" and good.epochs_run == 1 and 0 < good.best_val_map <= 1  # epochs_per_trial, not 3
    assert crashed.status == "error" and "injected crash" in crashed.error and crashed.val_map_by_epoch == []
    assert best_trial(outcomes) == good
    runs_log = (tmp_path / "images" / "runs.log").read_text().splitlines()  # one line per start of a trial's workers
    assert runs_log.count("0.3 1.2 0.01") == 1 and set(runs_log) == {"0.3 1.2 0.01", f"{FAILING_POS_MARGIN} 1.2 0.01"}
    assert not list((tmp_path / "ray").glob("search-*")), "the trials' Train runs are removed once the search ended"

    client = MlflowClient(mlflow.get_tracking_uri())
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
    finished = next(r for r in children if r.info.status == "FINISHED")
    assert finished.data.params[f"point/{POS}"] == "0.3" and finished.data.params[f"point/{NEG}"] == "1.2"
    assert [m.value for m in client.get_metric_history(finished.info.run_id, "val_map")] == [good.best_val_map]

    restored = run_search(recording_loop, job_for, search, cluster=cluster, name="search")
    assert (tmp_path / "images" / "runs.log").read_text().splitlines() == runs_log, "a restored search reran a trial"
    assert sorted((o.point[POS], o.status, o.best_val_map) for o in restored if o.status != "error") == \
        [(0.3, "finished", good.best_val_map)]


@pytest.mark.slow
def test_a_search_over_a_non_margin_param_trains_each_value(tmp_path, ray_local):
    """The tune stage's own job factory over `retrieval.lr`: every trial's Train job runs with its lr and the
    params' margins."""
    import pandas as pd

    from components.data.contract import check_splits
    from components.data.splits import split_classes
    from components.distributed import Cluster
    from components.tuning import run_search
    from pipelines.tune import job_factory, param_search
    from tests.tune_loops import recording_loop

    rows = tiny_sample(tmp_path / "images", classes=6, per_class=6, max_side=48)
    splits = check_splits(split_classes(pd.DataFrame([{"id": u, "label": l, "uri": u} for u, l in rows]), seed=0,
                                        class_ratio=(107, 20, 40), val_classes=None, test_classes=None,
                                        queries_per_class=2, classifier_train_fraction=0.7, min_images_per_class=6).splits,
                          "splits")
    params = load_params(_params_file(tmp_path, {"search": "grid", "space": {"retrieval.lr": _dim([0.001, 0.02], None)},
                                                 "max_concurrent_trials": 2},
                                      {"init": "imagenet", "batch_size": 4, "train_max_side": [48, 48],
                                       "sampler": {"name": "random_pairs", "args": {"pos_per_class": 2, "neg_per_class": 2,
                                                                                    "redraw_every": 1}}},
                                      model={"image_size": 48, "frozen_stages": 6}))
    outcomes = run_search(recording_loop, job_factory(params, splits), param_search(params.tune),
                          cluster=Cluster(1, 1, storage_path=str(tmp_path / "ray")), name="lr-search")

    assert sorted((o.point["retrieval.lr"], o.status, o.epochs_run) for o in outcomes) == \
        [(0.001, "finished", 1), (0.02, "finished", 1)]
    margins = params.retrieval.criterion.args
    assert sorted((tmp_path / "images" / "runs.log").read_text().splitlines()) == \
        [f"{margins.pos_margin} {margins.neg_margin} {lr}" for lr in (0.001, 0.02)]


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
    runs_log = tmp_path / "images" / "runs.log"
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
    assert runs.count("0.3 1.2 0.01") == 1, "the finished trial ran again"
    assert runs.count("0.4 1.2 0.01") == 2, "the interrupted trial did not resume"
