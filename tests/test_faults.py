"""Injected faults: a Ray Train worker killed mid-epoch, and `dvc repro` interrupted (SIGINT, then SIGKILL) in the
middle of a training stage."""

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml

from components.distributed import Cluster, run_training
from components.models.spec import NetSpec
from components.training.jobs import LabelledImages, Optimisation, RetrievalJob, RetrievalValSet
from tests.conftest import (TINY_PARAMS, contrastive, dvc, git_commit_all, random_pairs, set_params, stop_group, tiny_sample,
                            tiny_train_val, tool_env)
from tests.fault_loops import KILL_IN_EPOCH, loop_killed_once

pytestmark = pytest.mark.slow


def test_worker_killed_mid_epoch_resumes_from_the_last_checkpoint(tmp_path, ray_local):
    train, val = tiny_train_val(tmp_path / "images")
    epochs = 3
    job = RetrievalJob(
        net=NetSpec("tf_efficientnet_lite0", "gem", 3.0, 64, None, frozen_stages=5),
        optim=Optimisation(epochs=epochs, batch_size=4, lr=0.05, momentum=0.9, weight_decay=0.0, lr_step_epochs=10,
                           lr_gamma=0.1, train_max_side=(48, 64), hflip=True, seed=0),
        train=LabelledImages([u for u, _ in train], [l for _, l in train]),
        retrieval_val=RetrievalValSet([u for u, _ in val], [l - 4 for _, l in val], [i % 6 < 2 for i in range(len(val))]),
        criterion=contrastive(0.1, 1.5), sampler=random_pairs(4, 4, 1),
        audit_dir=str(tmp_path / "audit"),
    )
    out = run_training(loop_killed_once, job, name="test-kill", output_dir=tmp_path / "model",
                       cluster=Cluster(2, 1, False, str(tmp_path / "ray"), max_failures=1))

    assert (tmp_path / "killed").exists(), "rank 1 was killed once"
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(epochs + 1)), "the job finished with every epoch"
    for rank in (0, 1):  # every epoch reported (= checkpointed) exactly once over both attempts
        reported = Counter(int(e) for e in (tmp_path / f"reports-rank{rank}.txt").read_text().split())
        assert reported == Counter(range(epochs + 1)), f"rank {rank} reported {sorted(reported.elements())}"
    for rank in (0, 1):  # the attempt that finished resumed at the epoch that was cut short
        audit = json.loads((tmp_path / "audit" / f"rank{rank}.json").read_text())
        assert sorted(int(e) for e in audit["seen"]) == list(range(KILL_IN_EPOCH, epochs + 1))


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _stray_temporaries(repo: Path) -> list[str]:
    return [str(p.relative_to(repo)) for folder in ("data", "models", "metrics", "index") if (repo / folder).exists()
            for p in (repo / folder).rglob("*") if ".tmp" in p.name]


def test_dvc_repro_interrupted_mid_training_then_completes(repo_copy: Path):
    repo = repo_copy
    tiny_sample(repo / "data" / "sample", classes=12, per_class=8)
    set_params(repo, {**TINY_PARAMS, "classify": {**TINY_PARAMS["classify"], "epochs": 2}})
    git_commit_all(repo, "tiny")
    ray_results = repo / ".ray_results"

    with open(repo.parent / "interrupted-repro.log", "w") as out:
        run = subprocess.Popen(["dvc", "repro", "classify"], cwd=repo, env=tool_env(), start_new_session=True,
                               stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while not list(ray_results.glob("classify-*/checkpoint_manager_snapshot.json")):  # a checkpoint is registered
        assert run.poll() is None, f"dvc repro ended before training got going:\n{(repo.parent / 'interrupted-repro.log').read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        time.sleep(0.5)
    ours = psutil.Process(run.pid).children(recursive=True)
    assert any("pipelines.classify" in _command(p) for p in ours)
    os.killpg(run.pid, signal.SIGINT)  # Ctrl-C
    try:
        run.wait(20)
    except subprocess.TimeoutExpired:
        pass
    stop_group(run, grace=0)  # then SIGKILL whatever is left of the group
    _, alive = psutil.wait_procs(ours, timeout=60)
    assert not alive, f"left running after the interrupted repro: {[_command(p) for p in alive]}"

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {"ingest", "split"} <= set(lock) and "classify" not in lock, "an interrupted stage is never recorded"
    assert "up to date" not in dvc(repo, "status", "classify")

    log = dvc(repo, "repro", "classify")
    assert "Running stage 'classify'" in log
    for stage in ("ingest", "split"):
        assert f"Running stage '{stage}'" not in log, f"{stage} had finished before the interruption"
    history = json.loads((repo / "models" / "classify" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert json.loads((repo / "metrics" / "classify.json").read_text())["best_epoch"] in (0, 1, 2)
    assert "Data and pipelines are up to date" in dvc(repo, "status", "classify")
    assert not _stray_temporaries(repo)
