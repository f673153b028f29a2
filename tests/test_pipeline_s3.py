"""The distributed configuration end to end, over real network connections on loopback: `dvc repro` of the tiny
sample with the images read from an S3 bucket, Ray Train/Tune checkpoints on S3, runs and the registered model on
an `mlflow server` whose artifacts are proxied to S3, then `dvc push` to an S3 remote and `dvc pull` into a fresh
clone. The S3 endpoint is a moto server on 127.0.0.1; endpoint and credentials only in the environment."""

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import TINY_PARAMS, dvc, git_commit_all, mlflow_server, set_params, tiny_sample, tool_env

pytestmark = pytest.mark.slow
TUNE = {"space": {"retrieval.lr": {"values": [0.01, 0.003], "range": None, "log": False, "integer": False, "above": None}},
        "epochs_per_trial": 1,
        "asha": {"enabled": False, "grace_period": 1, "reduction_factor": 2}}
OUTPUTS = ["data/manifest.parquet", "data/splits.parquet", "models/classify/best.pt", "models/retrieval/best.pt", "models/search/best.pt",
           "tune/best_params.json", "index/CURRENT", "index/g000001/faiss.index", "plots/distances.png"]


def _keys(s3, bucket: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_dvc_repro_with_s3_and_an_mlflow_server(repo_copy: Path, s3_env: dict, tmp_path: Path, capsys):
    import boto3
    from mlflow import MlflowClient

    s3 = boto3.client("s3")
    for bucket in ("raw", "dvc", "mlflow", "ray"):
        s3.create_bucket(Bucket=bucket)
    for path, label in tiny_sample(tmp_path / "images", classes=12, per_class=8):
        s3.upload_file(path, "raw", f"photos/{label}/{Path(path).name}")

    repo = repo_copy
    set_params(repo, {**TINY_PARAMS, "tune": TUNE, "ingest": {"source": "s3://raw/photos", "min_side": 16},
                      "ray": {"storage_path": "s3://ray/results"}})
    git_commit_all(repo, "tiny, on S3")
    dvc(repo, "remote", "add", "-d", "storage", "s3://dvc/cache")  # endpoint and credentials: the environment
    git_commit_all(repo, "S3 remote")
    artifacts = "s3://mlflow/artifacts"
    with mlflow_server(tmp_path / "mlflow", artifacts, env={"MLFLOW_S3_ENDPOINT_URL": s3_env["AWS_ENDPOINT_URL"]}) as (url, _):
        env = tool_env(**s3_env, MLFLOW_TRACKING_URI=url)
        start = time.monotonic()
        log = dvc(repo, "repro", env=env, timeout=1800)
        wall = time.monotonic() - start
        with capsys.disabled():  # the README's timing, in the test log
            print(f"\ndvc repro on S3 + an MLflow server: {wall:.1f} s")
        for stage in ("ingest", "split", "classify", "tune", "retrieval", "postprocess", "index", "evaluate"):
            assert f"Running stage '{stage}'" in log

        manifest = pd.read_parquet(repo / "data/manifest.parquet")
        assert len(manifest) == 96 and all(u.startswith("s3://raw/photos/") for u in manifest["uri"])
        assert not (repo / ".ray_results").exists(), "no Ray checkpoint was written locally"
        ray_keys = _keys(s3, "ray")
        assert any(k.startswith("results/search-") and "experiment_state" in k for k in ray_keys), ray_keys[:20]
        assert not any(k.startswith(("results/classify-", "results/retrieval-")) for k in ray_keys), \
            "finished Train runs are removed from S3"

        client = MlflowClient(tracking_uri=url)
        experiment = client.get_experiment_by_name("firesight")
        assert experiment.artifact_location.startswith("mlflow-artifacts:"), "artifacts are proxied by the server"
        runs = client.search_runs([experiment.experiment_id])
        stages = {r.data.tags.get("firesight.stage") for r in runs}
        assert {"classify", "tune", "tune-trial", "retrieval", "evaluate"} <= stages
        champion = client.get_model_version_by_alias("firesight-retriever", "champion")
        metrics = json.loads((repo / "metrics.json").read_text())
        assert float(champion.tags["test_loo_map"]) == pytest.approx(metrics["test"]["leave_one_out"]["map"]["value"], abs=1e-6)
        mlflow_keys = _keys(s3, "mlflow")
        assert any(k.endswith("/MLmodel") for k in mlflow_keys) and any(k.endswith("best.pt") for k in mlflow_keys)
        retrieval_run = next(r for r in runs if r.data.tags.get("firesight.stage") == "retrieval")
        downloaded = client.download_artifacts(retrieval_run.info.run_id, "model/best.pt", str(tmp_path / "dl"))
        assert _md5(Path(downloaded)) == _md5(repo / "models/retrieval/best.pt")

    git_commit_all(repo, "repro")  # dvc.lock: what a fresh checkout pulls
    push = dvc(repo, "push", env=env)
    assert "pushed" in push and _keys(s3, "dvc")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    dvc(clone, "pull", env=env)
    for out in OUTPUTS:
        assert _md5(clone / out) == _md5(repo / out), out
    # A pulled clone is up to date but for the scan, which always looks at the source; rerun, it finds the same
    # listing, so nothing after it reruns (the clone has no .venv: its stages run on this interpreter)
    assert json.loads(dvc(clone, "status", "--json", env=env)) == {"scan": ["always changed"]}
    rerun = dvc(clone, "repro", env={**env, "FIRESIGHT_PYTHON": sys.executable})
    assert re.findall(r"Running stage '(\w+)'", rerun) == ["scan"], rerun[-3000:]
