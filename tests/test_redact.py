"""Credentials never reach a message, a log line or Tune's saved state: the redact helper, the stage runner's
output, and the callbacks Tune pickles."""

import logging
import subprocess
import sys

import pytest

from components.redact import RedactingFilter, redact
from tests.conftest import REPO

SECRET = "pw-Hq7Zt2"


@pytest.mark.parametrize("text, expected", [
    (f"http://alice:{SECRET}@mlflow:5000/api", "http://***@mlflow:5000/api"),
    (f"MLflow at 'https://alice:{SECRET}@host' failed", "MLflow at 'https://***@host' failed"),
    (f"http://alice:p@ss{SECRET}@host:9000/bucket", "http://***@host:9000/bucket"),  # an unencoded @ in the password
    (f"s3 at http://alice:{SECRET}@a:1 and http://bob:{SECRET}@b:2", "s3 at http://***@a:1 and http://***@b:2"),
    (f"https://host/x?X-Amz-Signature={SECRET}&a=1", "https://host/x?X-Amz-Signature=***&a=1"),
    (f"https://host/x?a=1&access_token={SECRET}", "https://host/x?a=1&access_token=***"),
    ("http://mlflow:5000/api/2.0 and alice@example.com", "http://mlflow:5000/api/2.0 and alice@example.com"),
])
def test_redact_masks_userinfo_and_secret_query_values(text, expected):
    assert redact(text) == expected


def test_redact_masks_the_credential_environment_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "abc")  # too short to mask safely
    assert redact(f"signature for {SECRET} mismatched; abc") == "signature for *** mismatched; abc"


def test_redacting_filter_cleans_messages_arguments_and_tracebacks():
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect()
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test_redact")
    logger.addHandler(handler)
    try:
        logger.warning("tracking at %s", f"http://u:{SECRET}@h:1")
        try:
            raise ConnectionError(f"cannot reach http://u:{SECRET}@h:1")
        except ConnectionError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert records[0] == "tracking at http://***@h:1"
    assert SECRET not in "".join(records) and "ConnectionError: cannot reach http://***@h:1" in records[1]


STAGE = f"""
import logging
from components.errors import FiresightError
from pipelines._runner import run_stage

def stage(params):
    logging.getLogger("mlflow").warning("using http://u:{SECRET}@h:1")
    raise FiresightError("cannot reach http://u:{SECRET}@h:1")

run_stage("ingest", stage)
"""


def test_a_stage_prints_and_logs_no_credential(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    done = subprocess.run([sys.executable, "-c", STAGE], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    printed = done.stdout + done.stderr + "".join(f.read_text() for f in tmp_path.glob("logs/*.log"))
    assert "using http://***@h:1" in printed
    assert done.stderr.strip().splitlines()[-1].startswith("firesight ingest: error: cannot reach http://***@h:1")
    assert SECRET not in printed


def test_tune_saved_state_holds_no_tracking_credential(tmp_path, monkeypatch):
    """Tune pickles its RunConfig, callbacks included, into tuner.pkl under the storage path; restored, the MLflow
    callback logs nested trial runs to the driver's current tracking server."""
    import mlflow
    import ray.cloudpickle as cloudpickle
    import ray.tune as tune

    from components.tuning import search_callbacks

    before = mlflow.get_tracking_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MLflow sets it; restored after the test
    try:
        mlflow.set_tracking_uri(f"http://alice:{SECRET}@127.0.0.1:1")
        state = cloudpickle.dumps(tune.RunConfig(name="search", callbacks=search_callbacks(("tune-test", "parent-1"))))
        assert SECRET.encode() not in state

        store = f"sqlite:///{tmp_path / 'mlflow.db'}"
        mlflow.set_tracking_uri(store)
        experiment = mlflow.create_experiment("tune-test", artifact_location=(tmp_path / "artifacts").as_uri())
        [callback] = cloudpickle.loads(state).callbacks
        callback.setup()
        assert store.encode() not in cloudpickle.dumps(callback), "set up, the callback still pickles no URI"

        class Trial:
            config = {"margins": [0.3, 1.2]}

            def __str__(self) -> str:
                return "trial_1"

        callback.log_trial_start(Trial())
        [run] = mlflow.search_runs([experiment], output_format="list")
        assert run.data.tags["mlflow.parentRunId"] == "parent-1" and run.data.params["margins"] == "[0.3, 1.2]"
    finally:
        mlflow.set_tracking_uri(before)
