"""A local Ray is private: beside a cluster that `ray start` left on the machine, ensure_ray() starts its own, and
joins that cluster only when the `ray.address` param or RAY_ADDRESS names it."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, stop_group

PROBE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from components.distributed import ensure_ray
import ray

ensure_ray(*sys.argv[1:])
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address}))
"""


@pytest.fixture(scope="module")
def ray_start_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head` (1 CPU, on loopback) as a user would leave it: the machine's latest cluster, recorded in
    the Ray temp folder ray.init() reads. That folder is this test's own (RAY_TMPDIR), so no other Ray on the machine
    sees it; the head runs in its own process group, stopped (then killed) at the end. Yields (GCS address, env)."""
    tmp = Path(tempfile.mkdtemp(prefix="fsray", dir="/tmp"))  # short: Ray's unix socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": str(tmp), "PYTHONPATH": str(REPO)}
    port = free_port()
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
               "--num-cpus=1", "--include-dashboard=false", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
               f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}"]
    with open(tmp / "ray-start.log", "w") as out:
        head = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    recorded = tmp / "ray" / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 180
        while not recorded.exists():
            assert head.poll() is None, f"ray start exited: {(tmp / 'ray-start.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not up after 180 s: {(tmp / 'ray-start.log').read_text()[-3000:]}"
            time.sleep(0.5)
        address = recorded.read_text().strip()
        assert address.endswith(f":{port}")
        yield address, env
    finally:
        stop_group(head, grace=5)
        shutil.rmtree(tmp, ignore_errors=True)


def _probe(env: dict[str, str], *address: str) -> tuple[str, str]:
    """ensure_ray(*address) in a fresh process: (the GCS address it is connected to, its log)."""
    done = subprocess.run([sys.executable, "-c", PROBE, *address], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["gcs"], done.stderr


@pytest.mark.slow
def test_local_ray_is_private_beside_a_ray_start_cluster(ray_start_cluster):
    head, env = ray_start_cluster
    gcs, log = _probe(env)
    assert gcs != head, "ensure_ray() joined the cluster `ray start` left instead of starting a private Ray"
    assert "Ray: private local Ray on 127.0.0.1 (" in log and "joined" not in log


@pytest.mark.slow
@pytest.mark.parametrize("how", ["param", "RAY_ADDRESS"])
def test_the_param_or_ray_address_joins_that_cluster(ray_start_cluster, how):
    head, env = ray_start_cluster
    env = {**env, "RAY_AUTH_MODE": "token"}  # the head's token auth (Ray's default); the token is in ~/.ray
    gcs, log = _probe(env, head) if how == "param" else _probe({**env, "RAY_ADDRESS": head})
    assert gcs == head
    assert f"Ray: joined the cluster at {head}" in log


def test_the_joined_line_carries_no_credential(monkeypatch, caplog):
    import ray

    from components.distributed import ensure_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)  # only the line is under test here
    with caplog.at_level("INFO", logger="components.distributed"):
        ensure_ray("ray://alice:Sx9-secret@head.example:10001")
    assert "Ray: joined the cluster at ray://***@head.example:10001" in caplog.text
    assert "Sx9-secret" not in caplog.text


SHOUT = """
import sys, time
from components.distributed import ensure_ray
import ray

ensure_ray(forward_logs=sys.argv[1] == "on")
shout = ray.remote(lambda: print("a worker's line", file=sys.stderr, flush=True))
ray.get(shout.remote())
time.sleep(10)  # Ray's log monitor forwards within a second or so: room for a slow machine
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("forward", ["on", "off"])
def test_worker_lines_reach_the_driver_only_when_forwarded(forward):
    done = subprocess.run([sys.executable, "-c", SHOUT, forward], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("a worker's line" in done.stderr) == (forward == "on"), done.stderr[-3000:]
