"""Two Ray nodes on loopback (`ray.cluster_utils.Cluster`, in a process of its own): a 2-worker Ray Train job and the
Ray Data embedding place their work on both nodes, with images and checkpoints on S3 (the moto server) — so nothing
may assume one node or a shared local disk."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, stop_group, tiny_sample

pytestmark = pytest.mark.slow


def test_training_and_embedding_run_on_both_nodes_from_s3(s3_env, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="two-nodes")
    rows = tiny_sample(tmp_path / "images", classes=6, per_class=6)
    names = sorted({label for _, label in rows})
    uris = []
    for path, label in rows:
        key = f"images/{label}/{os.path.basename(path)}"
        s3.upload_file(path, "two-nodes", key)
        uris.append((f"s3://two-nodes/{key}", names.index(label)))
    job = {"train": [[u, l] for u, l in uris if l < 4], "val": [[u, l - 4] for u, l in uris if l >= 4],
           "storage": "s3://two-nodes/ray", "out": str(tmp_path / "model")}
    (tmp_path / "job.json").write_text(json.dumps(job))

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | s3_env | {"PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "tests.two_node_job", str(tmp_path / "job.json")], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=900)
    finally:
        stop_group(process, grace=5)
    assert process.returncode == 0, stderr[-5000:]
    placed = json.loads(stdout.strip().splitlines()[-1])

    assert placed["nodes"] == ["node_a", "node_b"]
    assert placed["train_workers"] == ["node_a", "node_b"], placed  # one Ray Train worker on each node
    assert placed["embedding_actors"] == ["node_a", "node_b"], placed  # one Ray Data actor on each node
    assert placed["described"] == list(range(len(uris))) and placed["errors"] == {}
    assert placed["max_abs_diff"] <= 1e-5  # the single-process descriptors, from the model trained on both nodes
    assert placed["best_epoch"] in (0, 1)
    left = [o["Key"] for o in s3.list_objects_v2(Bucket="two-nodes", Prefix="ray/").get("Contents", [])]
    assert left in ([], ["ray/"]), left  # the run's checkpoints on S3 are gone once the model is copied out (an
    # empty folder marker may stay)
