"""What a stage shows on the terminal: by default its progress (a bar per training epoch with its loss and val
metrics) and one summary line, with Ray's chatter in logs/<stage>.log; FIRESIGHT_VERBOSE=1 shows everything; Ctrl-C
is one line and exit code 130."""

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from components.models.spec import NetSpec
from components.training.context import LocalContext
from components.training.jobs import LabelledImages, Optimisation, RetrievalJob, RetrievalValSet
from components.training.retrieval import train_retrieval
from tests.conftest import REPO, contrastive, random_pairs, tiny_train_val

INTERRUPTED_STAGE = """
from pipelines._runner import run_stage

def stage(params):
    print("a table the stage prints")
    raise KeyboardInterrupt

run_stage("classify", stage)
"""

CHATTY_STAGE = """
import logging, os, warnings
from pipelines._runner import run_stage

def stage(params):
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    warnings.warn("a library's warning")
    print("a table the stage prints")
    os.write(2, b"a native library's line\\n")  # as Ray's core worker writes: to the descriptor, not sys.stderr
    log = logging.getLogger(__name__)
    log.info("reading the source")
    log.warning("3 images quarantined")
    log.info("kept 45 images in 3 classes")

run_stage("ingest", stage)
"""

TRAINING_STAGE = """
import pickle
from pathlib import Path
from components.distributed import Cluster, run_training
from components.training.retrieval import train_retrieval
from pipelines._runner import run_stage

def stage(params):
    job = pickle.loads(Path("job.pkl").read_bytes())  # written by the test itself
    run_training(train_retrieval, job, name="retrieval", cluster=Cluster(2, 1, False, str(Path("ray").resolve())),
                 output_dir=Path("model"))

run_stage("retrieval", stage)
"""


def _job(tmp_path: Path) -> RetrievalJob:
    train, val = tiny_train_val(tmp_path / "images")
    return RetrievalJob(
        net=NetSpec("tf_efficientnet_lite0", "gem", 3.0, 64, None, frozen_stages=5),
        optim=Optimisation(epochs=1, batch_size=4, lr=0.05, momentum=0.9, weight_decay=0.0, lr_step_epochs=10,
                           lr_gamma=0.1, train_max_side=(48, 64), hflip=True, seed=0),
        train=LabelledImages([u for u, _ in train], [l for _, l in train]),
        retrieval_val=RetrievalValSet([u for u, _ in val], [l - 4 for _, l in val], [i % 6 < 2 for i in range(12)]),
        criterion=contrastive(0.1, 1.5), sampler=random_pairs(4, 4, 1))


def _run(tmp_path: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    """`script` run as a stage in `tmp_path` (the repo's params.yaml) with `env`, without RAY_ADDRESS."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FIRESIGHT_VERBOSE")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, timeout=600,
                          env={**base, "PYTHONPATH": str(REPO), **env})
    done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode()  # as written: a bar redraws after "\r"
    return done


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    done = _run(tmp_path, INTERRUPTED_STAGE)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "firesight classify: interrupted; nothing was recorded for this stage — run it again\n"
    assert done.stdout == ""
    assert "a table the stage prints" in (tmp_path / "logs" / "classify.log").read_text()


def test_a_stage_shows_its_warnings_and_one_line_with_its_result(tmp_path):
    done = _run(tmp_path, CHATTY_STAGE)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    warning, summary = done.stderr.splitlines()
    assert warning == "firesight ingest: WARNING 3 images quarantined"
    assert re.fullmatch(r"firesight ingest: done in [0-9.]+ s; kept 45 images in 3 classes \(log: logs/ingest.log\)",
                        summary)
    log = (tmp_path / "logs" / "ingest.log").read_text()
    for line in ("Creating initial MLflow database tables", "UserWarning: a library's warning",
                 "a table the stage prints", "a native library's line", "reading the source", "3 images quarantined",
                 summary):
        assert line in log


def test_training_loop_reports_each_step(tmp_path):
    ctx = LocalContext(tmp_path / "run")
    train_retrieval(_job(tmp_path), ctx)
    steps = ctx.steps[-1][2]
    assert steps > 1 and [s[:3] for s in ctx.steps] == [(1, step, steps) for step in range(1, steps + 1)]
    assert ctx.steps[-1][3] == pytest.approx(ctx.reports[-1]["train_loss"])  # the running mean ends at the epoch's


def _training_stage(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """A 2-worker, 1-epoch retrieval fine-tune run as a stage."""
    (tmp_path / "job.pkl").write_bytes(pickle.dumps(_job(tmp_path)))
    done = _run(tmp_path, TRAINING_STAGE, **env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_a_training_stage_shows_its_epochs_and_one_line(tmp_path):
    done = _training_stage(tmp_path)
    terminal = done.stdout + done.stderr
    lines = [line.rsplit("\r", 1)[-1] for line in terminal.rstrip("\n").split("\n")]  # a bar: its last state
    assert lines[0].startswith("retrieval epoch 0: val_map="), terminal
    assert lines[1].startswith("retrieval epoch 1: 100%") and "loss=" in lines[1] and "val_map=" in lines[1]
    assert lines[2].startswith("firesight retrieval: done in ") and lines[2].endswith(" s (log: logs/retrieval.log)")
    assert len(lines) == 3, terminal
    log = (tmp_path / "logs" / "retrieval.log").read_text()
    for chatter in ("Reporting training result", "Started a local Ray instance", "Ray: private local Ray on 127.0.0.1"):
        assert chatter in log
    assert "\n(RayTrainWorker pid=" in log, "workers' lines without terminal colours"


@pytest.mark.slow
def test_verbose_shows_ray_chatter_on_the_terminal(tmp_path):
    done = _training_stage(tmp_path, FIRESIGHT_VERBOSE="1")
    terminal = done.stdout + done.stderr
    for chatter in ("Reporting training result", "Started a local Ray instance", "Ray: private local Ray on 127.0.0.1"):
        assert chatter in terminal
    assert terminal.rstrip().splitlines()[-1].startswith("firesight retrieval: done in ")
    assert not (tmp_path / "logs").exists()
