import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"

# The tests start their own Rays (private, on loopback) and never join a cluster RAY_ADDRESS names: cleared before
# any test module imports `components`, which reads it once to choose Ray's node IP (see components/__init__.py).
os.environ.pop("RAY_ADDRESS", None)


def tiny_sample(target: Path, classes: int, per_class: int, max_side: int = 64) -> list[tuple[str, str]]:
    """Copy `classes` × `per_class` real images of the committed sample, shrunk to `max_side`; return (path, label)."""
    rows = []
    names = sorted(d.name for d in SAMPLE.iterdir() if d.is_dir())[:classes]
    for name in names:
        (target / name).mkdir(parents=True, exist_ok=True)
        for f in sorted((SAMPLE / name).iterdir())[:per_class]:
            with Image.open(f) as im:
                im = im.convert("RGB")
                im.thumbnail((max_side, max_side))
                im.save(target / name / f.name, format="JPEG")
            rows.append((str(target / name / f.name), name))
    return rows


def random_net(image_size: int = 64):
    """lite0 + GeM with seeded random weights (nothing downloaded), in eval mode."""
    import torch

    from components.models.net import RetrievalNet

    torch.manual_seed(0)
    return RetrievalNet.create("tf_efficientnet_lite0", "gem", image_size=image_size, weights=None).eval()


def tiny_train_val(target: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """6 classes × 6 tiny real images: (path, class index) of classes 0-3 to train on, and of classes 4-5 to validate."""
    rows = tiny_sample(target, classes=6, per_class=6)
    labels = {name: i for i, name in enumerate(sorted({label for _, label in rows}))}
    return ([(u, labels[label]) for u, label in rows if labels[label] < 4],
            [(u, labels[label]) for u, label in rows if labels[label] >= 4])


def tiny_retrieval_data(target: Path):
    """5 classes × 6 tiny real images: classes 0-2 to train on (LabelledImages), 3-4 held out (RetrievalValSet, 2
    queries per class)."""
    from components.training.jobs import LabelledImages, RetrievalValSet

    rows = tiny_sample(target, classes=5, per_class=6, max_side=48)
    names = sorted({label for _, label in rows})
    labelled = [(u, names.index(l)) for u, l in rows]
    train = [(u, l) for u, l in labelled if l < 3]
    val = [(u, l - 3) for u, l in labelled if l >= 3]
    return (LabelledImages([u for u, _ in train], [l for _, l in train]),
            RetrievalValSet([u for u, _ in val], [l for _, l in val], [i % 6 < 2 for i in range(len(val))]))


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray for the session's distributed tests (RAY_ADDRESS is cleared above), shut down at the end.
    Its servers' and workers' lines are not forwarded: they would land in whatever test's captured stderr is open."""
    from components.distributed import ensure_ray  # before ray itself: `components` keeps a local Ray on loopback
    import ray

    ensure_ray(forward_logs=False)
    yield
    ray.shutdown()


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A copy of the pipeline code and config (not data or outputs) in a fresh git repo."""
    dst = tmp_path / "repo"
    for item in ("components", "pipelines", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore"):
        src = REPO / item
        (dst / item).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst / item)
    return dst


S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible endpoint (moto server) on 127.0.0.1 for the session; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """This test's environment points S3 at the moto server; returns the variables set."""
    env = {"AWS_ENDPOINT_URL": s3_server, **S3_TEST_CREDENTIALS}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(folder: Path, artifacts: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real `mlflow server` on 127.0.0.1 (sqlite in `folder`, proxied artifacts to `artifacts`, a local folder
    or s3:// URI); yields (URL, process) once /health answers, stops it afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(folder / "mlflow-server.log", "w")
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", artifacts,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(folder / 'mlflow-server.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not up after 300 s: {(folder / 'mlflow-server.log').read_text()[-2000:]}")
            time.sleep(1)
        yield url, server
    finally:
        stop_group(server)
        log.close()


def stop_group(process: subprocess.Popen, grace: float = 30) -> None:
    """Stop a process started with start_new_session=True and everything left in its group: SIGTERM, then
    SIGKILL after `grace` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


TINY_PARAMS = {  # a whole `dvc repro` in a few minutes on 2 CPU cores
    "ingest": {"source": "data/sample", "min_side": 16},
    "model": {"image_size": 64, "frozen_stages": 5},
    "classify": {"epochs": 1, "batch_size": 16, "train_max_side": [56, 72]},
    "retrieval": {"epochs": 1, "train_max_side": [64, 64],  # the default recipe (cached trunk, MS on P×K), tiny
                  "sampler": {"name": "class_balanced", "args": {"classes_per_batch": 4, "images_per_class": 2,
                                                                 "batches_per_epoch": 4}}},
    "postprocess": {"image_sizes": [], "scale_sets": [[1.0]],  # a few of each step's candidates, at 64 px
                    "whitening": {"kinds": ["center"], "dims": [None], "shrinkages": [0.5]},
                    "dba": {"k": [0, 2], "alpha": [3.0]}, "qe": {"k": [0, 2], "alpha": [3.0]},
                    "k_reciprocal": {"k1": [], "k2": [2], "lambda_value": [0.3]}},
}


def params_with(changes: dict, base: Path = REPO / "params.yaml") -> str:
    """The YAML of `base` (the committed params.yaml) with each section updated by `changes` (a key given None is
    removed)."""
    import yaml

    params = yaml.safe_load(base.read_text())
    for section, values in changes.items():
        params[section].update(values)
        params[section] = {k: v for k, v in params[section].items() if values.get(k, "") is not None}
    return yaml.safe_dump(params, sort_keys=False)


def set_params(repo: Path, changes: dict) -> None:
    (repo / "params.yaml").write_text(params_with(changes, repo / "params.yaml"))


def git_commit_all(repo: Path, message: str) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    if not (repo / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", message], cwd=repo, check=True)


def tool_env(**extra: str) -> dict[str, str]:
    """The environment for dvc/mlflow subprocesses: this venv's tools first on PATH, no inherited MLflow or Ray
    cluster settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return {**env, **extra}


def dvc(repo: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    """Run `dvc args` in `repo`; fail the test with its output unless it succeeds; return stdout + stderr."""
    done = subprocess.run(["dvc", *args], cwd=repo, env=env or tool_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout + done.stderr


def make_image(path: Path, seed: int, size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> Path:
    """Write a noise image (distinct content per seed)."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


INGEST_CAPS = {"max_file_bytes": 64 * 2**20, "max_pixels": 50_000_000}  # params.yaml's ingest caps


def contrastive(pos_margin: float, neg_margin: float, squared: bool = True):
    """The double-margin contrastive criterion spec."""
    from components.registry import Spec

    return Spec("double_margin_contrastive", {"pos_margin": pos_margin, "neg_margin": neg_margin, "squared": squared})


def random_pairs(pos_per_class: int, neg_per_class: int, redraw_every: int = 1):
    """DeepFirearm's random-pairs sampler spec."""
    from components.registry import Spec

    return Spec("random_pairs", {"pos_per_class": pos_per_class, "neg_per_class": neg_per_class, "redraw_every": redraw_every})


def on_pairs(loss, f1, f2, same, c1=None, c2=None):
    """`loss` (the one criterion signature) over the pairs (f1[k], f2[k]): the batch [f1; f2] with the index tuple
    of its pairs; c1, c2 are the images' class labels (default: labels consistent with `same`)."""
    import torch

    from components.losses.pairs import pair_tuple

    if c1 is None:
        c1 = torch.arange(len(same))
        c2 = torch.where(same.bool(), c1, c1 + len(same))
    return loss(torch.cat([f1, f2]), torch.cat([c1, c2]), pair_tuple(same))


POS_MARGIN, NEG_MARGIN = "retrieval.criterion.args.pos_margin", "retrieval.criterion.args.neg_margin"


def margin_space(pos: list[float], neg: list[float]) -> dict:
    """tune params searching the double margin's grid pos × neg (m− above m+)."""
    dim = {"range": None, "log": False, "integer": False}
    return {"space": {POS_MARGIN: {**dim, "values": pos, "above": None},
                      NEG_MARGIN: {**dim, "values": neg, "above": {"path": POS_MARGIN, "gap": 0.05}}}}
