"""MLflow integration: one run per stage, per-epoch metrics, and the model registry with a champion alias."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from components.errors import FiresightError
from components.redact import redact

log = logging.getLogger(__name__)

ARTIFACT_ROOT = Path("mlartifacts")
MODEL_CODE = Path(__file__).with_name("registry_model.py")
# What the logged pyfunc model needs at load time; given explicitly so MLflow need not infer it (slow).
MODEL_PIP_REQUIREMENTS = ["torch==2.15.0", "torchvision==0.29.2", "timm==1.0.31", "pillow==13.0.0", "numpy==2.4.6"]


# A tracking server that is down fails the stage within about a minute instead of MLflow's default minutes of
# retries (the user's own MLFLOW_HTTP_REQUEST_* settings win).
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingError(FiresightError):
    """The MLflow tracking server cannot be reached or rejected a request."""


def configure(uri: str, experiment: str) -> None:
    """Point MLflow at MLFLOW_TRACKING_URI if set, else `uri`; create the experiment (artifacts under
    ./mlartifacts for a local store) if needed. A tracking server that is down is a `TrackingError` here, before
    the stage does any work (fail fast: nothing is buffered)."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", uri))
    with tracking_errors("open experiment " + experiment):
        if mlflow.get_experiment_by_name(experiment) is None:
            local = mlflow.get_tracking_uri().startswith(("sqlite:", "file:")) or "://" not in mlflow.get_tracking_uri()
            mlflow.create_experiment(experiment, artifact_location=ARTIFACT_ROOT.resolve().as_uri() if local else None)
        mlflow.set_experiment(experiment)


@contextmanager
def tracking_errors(operation: str) -> Iterator[None]:
    """Turn MLflow's failures (server down, timeouts, rejected requests) into one `TrackingError` line naming the
    tracking URI (credentials redacted) and `operation`."""
    try:
        yield
    except (MlflowException, requests.exceptions.RequestException) as e:
        raise TrackingError(redact(f"MLflow at {mlflow.get_tracking_uri()}: cannot {operation}: {_explain(e)}")) from None


def _explain(e: Exception) -> str:
    text = " ".join(str(e).split())
    if "Connection refused" in text or "Failed to establish" in text or "Max retries exceeded" in text:
        return ("server unreachable (connection refused) after "
                f"{os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES']} retries; start it (infra/mlflow-server.sh) or "
                "unset MLFLOW_TRACKING_URI to use the embedded sqlite store")
    if "timed out" in text.lower():
        return f"no answer within {os.environ['MLFLOW_HTTP_REQUEST_TIMEOUT']} s"
    if "error code 401 " in text:
        return ("authentication failed (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a "
                "user of this server")
    return text[:300]


@contextmanager
def stage_run(stage: str, params: dict[str, Any], tags: dict[str, str] | None = None,
              resume_tag: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for a stage. With `resume_tag` (a key of `tags`), the latest run of this experiment carrying
    the same tag value is continued instead of starting a new one (a restored search keeps its parent run).
    Any MLflow failure inside is one `TrackingError`."""
    tags = {"firesight.stage": stage, **(tags or {})}
    with tracking_errors(f"record the {stage} run"):
        run_id = _latest_run_with_tag(resume_tag, tags[resume_tag]) if resume_tag else None
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else stage, tags=tags) as run:
            if run_id is None:
                mlflow.log_params(_flatten(params))
            yield run


def _latest_run_with_tag(key: str, value: str) -> str | None:
    runs = mlflow.search_runs(filter_string=f"tags.`{key}` = '{value}'", order_by=["start_time DESC"], max_results=1,
                              output_format="list")
    return runs[0].info.run_id if runs else None


def log_history(history: list[dict[str, float]]) -> None:
    """Log every per-epoch metric with step = epoch (epoch 0 is the starting point, before training)."""
    for row in history:
        step = int(row["epoch"])
        mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=step)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    champion: bool
    reason: str


def register_model(
    *,
    checkpoint: Path,
    example_image: np.ndarray,
    name: str,
    alias: str,
    metric: str,
    value: float,
    tags: dict[str, str],
) -> Registration:
    """Log the checkpoint as a pyfunc model in the active run, register it as a new version of `name` with
    `tags`, and move `alias` to it only if `value` of `metric` beats the current holder's."""
    from components.models.net import read_checkpoint

    example = example_image[None]
    dim = read_checkpoint(checkpoint)["meta"]["dim"]
    signature = ModelSignature(  # any image size; the model resizes to its meta's image_size
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]),
    )
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),  # models-from-code: nothing pickled
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(__file__).parent)],
        signature=signature,
        input_example=example,
        pip_requirements=MODEL_PIP_REQUIREMENTS,
        registered_model_name=name,
    )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, val in tags.items():
        client.set_model_version_tag(name, version, key, val)
    client.set_model_version_tag(name, version, metric, f"{value:.6f}")
    champion, reason = _challenge(client, name, alias, metric, value, version)
    if champion:
        client.set_registered_model_alias(name, alias, version)
    log.info("registered %s version %s; %s", name, version, reason)
    return Registration(name, version, champion, reason)


def _challenge(client: MlflowClient, name: str, alias: str, metric: str, value: float, version: str) -> tuple[bool, str]:
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return True, f"alias '{alias}' moved to version {version}: there was no '{alias}' yet ({metric}={value:.4f})"
    held = holder.tags.get(metric)
    if held is None:
        return True, f"alias '{alias}' moved to version {version}: version {holder.version} has no {metric} tag"
    if value > float(held):
        return True, f"alias '{alias}' moved to version {version}: {metric} {value:.4f} beats version {holder.version}'s {float(held):.4f}"
    return False, f"alias '{alias}' stays on version {holder.version}: its {metric} {float(held):.4f} >= this version's {value:.4f}"
