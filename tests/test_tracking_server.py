"""MLflow tracking server down: the stage fails fast with one line naming the server (nothing is buffered)."""

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mlflow.exceptions import MlflowException

from components import tracking
from components.tracking import TrackingError
from tests.conftest import REPO, free_port, mlflow_server

SECRET = "pw-Lk4Rm8"

STAGE = """
import os, signal
from components import tracking
from pipelines._runner import run_stage

def stage(params):
    tracking.configure(params.tracking.uri, params.tracking.experiment)
    with tracking.stage_run("classify", {"lr": 0.1}):
        tracking.log_history([{"epoch": 0, "val_map": 0.5}])
        os.killpg(int(os.environ["SERVER_PID"]), signal.SIGKILL)  # the server dies in the middle of the stage
        tracking.log_history([{"epoch": 1, "val_map": 0.6}])

run_stage("classify", stage)
"""

def test_tracking_server_down_at_start_fails_fast(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    start = time.monotonic()
    with pytest.raises(TrackingError) as err:
        tracking.configure("sqlite:///unused.db", "firesight")
    assert str(err.value).startswith(f"MLflow at {url}: cannot open experiment firesight: server unreachable")
    assert time.monotonic() - start < 60

def test_credentials_in_the_tracking_uri_never_reach_the_message(monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@{address}")
    with pytest.raises(TrackingError) as err:
        tracking.configure("sqlite:///unused.db", "firesight")
    assert str(err.value).startswith(f"MLflow at http://***@{address}: cannot open experiment firesight: server "
                                     "unreachable"), str(err.value)
    with pytest.raises(TrackingError) as err, tracking.tracking_errors("log metrics"):  # an unclassified failure
        raise MlflowException(f"API request to http://alice:{SECRET}@{address}/api/2.0 failed with exception SSLError")
    assert str(err.value) == (f"MLflow at http://***@{address}: cannot log metrics: API request to "
                              f"http://***@{address}/api/2.0 failed with exception SSLError")


class _Unauthorized(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"You are not authenticated."
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_rejected_tracking_credentials_are_one_line_naming_the_variables(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    try:
        with pytest.raises(TrackingError) as err:
            tracking.configure("sqlite:///unused.db", "firesight")
    finally:
        server.shutdown()
    assert str(err.value) == (f"MLflow at {url}: cannot open experiment firesight: authentication failed (HTTP "
                              "401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of this server")


@pytest.mark.slow
def test_tracking_server_lost_mid_stage_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    with mlflow_server(tmp_path / "server", str(tmp_path / "server" / "artifacts")) as (url, server):
        env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": url, "SERVER_PID": str(server.pid)}
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-c", STAGE], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"firesight classify: error: MLflow at {url}: cannot record the classify run: "
                           "server unreachable (connection refused) after 3 retries"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert elapsed < 120, f"took {elapsed:.0f} s"
