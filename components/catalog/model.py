"""Where a search model comes from — a checkpoint (or a folder holding best.pt), an exported ONNX file, or the MLflow
registry (`models:/name@alias`, `models:/name/version`) — and the registry's side of model identity (each version
tagged with its weights digest; the ONNX export attached to its version)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from components.catalog.describe import DIGEST_KEY, Describer
from components.errors import FiresightError
from components.redact import redact

ONNX_TAG = "onnx_artifact"  # a model version's tag: the runs:/ URI of its ONNX export
CHECKPOINT_NAME = "best.pt"


@dataclass(frozen=True)
class LoadedModel:
    describer: Describer
    source: str  # what the user named (credentials redacted)
    registry_version: str | None  # "name/version" when it came from the registry
    metrics: dict[str, float]  # the registered version's test figures (its tags test_*), when registered


def load_model(ref: str, *, engine: str = "torch", tracking_uri: str | None = None) -> LoadedModel:
    """The describer `ref` names, for `engine` "torch" (a checkpoint) or "onnx" (onnxruntime, no torch)."""
    if engine not in ("torch", "onnx"):
        raise FiresightError(f"engine must be torch or onnx, got {engine!r}")
    if ref.startswith("models:/"):
        return _from_registry(ref, engine, tracking_uri)
    path = Path(ref)
    if path.is_dir():
        path = path / ("model.onnx" if engine == "onnx" else CHECKPOINT_NAME)
    if not path.is_file():
        raise FiresightError(f"{path}: no such model file (a checkpoint such as models/search/best.pt, an .onnx "
                             "export, or models:/<name>@<alias> from the registry)")
    return LoadedModel(_describer(path, engine), str(path), None, {})


def _describer(path: Path, engine: str) -> Describer:
    if engine == "onnx" or path.suffix == ".onnx":
        if engine != "onnx":
            raise FiresightError(f"{path}: an ONNX model needs --engine onnx")
        from components.export.onnx import OnnxDescriber

        return OnnxDescriber(path)
    from components.catalog.describe import TorchDescriber
    from components.models.net import load_net

    return TorchDescriber(load_net(path))


def use_tracking(tracking_uri: str | None):
    """MLflow pointed at MLFLOW_TRACKING_URI if set, else `tracking_uri` (params' tracking.uri)."""
    import mlflow

    from components import tracking

    for key, value in tracking.HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", tracking_uri or "sqlite:///mlflow.db"))
    return mlflow


def _from_registry(ref: str, engine: str, tracking_uri: str | None) -> LoadedModel:
    mlflow = use_tracking(tracking_uri)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, _, selector = ref.removeprefix("models:/").partition("@")
    if not selector:
        name, _, selector = name.partition("/")
    where = redact(mlflow.get_tracking_uri())
    client = MlflowClient()
    try:
        version = (client.get_model_version_by_alias(name, selector) if "@" in ref
                   else client.get_model_version(name, selector))
    except MlflowException:
        raise FiresightError(f"{ref}: not in the MLflow registry at {where}; `dvc repro` registers the model (its "
                             "evaluate stage), or pass --model a checkpoint such as models/search/best.pt") from None
    target = tempfile.mkdtemp(prefix="firesight-model-")
    try:
        if engine == "onnx":
            artifact = version.tags.get(ONNX_TAG)
            if not artifact:
                raise FiresightError(f"{ref} (version {version.version}) has no ONNX export; make one with "
                                     f"`firesight export onnx --model {ref}`")
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact, dst_path=target))
        else:
            path = Path(mlflow.artifacts.download_artifacts(  # the checkpoint alone, not the model's code
                artifact_uri=f"models:/{name}/{version.version}/artifacts/{CHECKPOINT_NAME}", dst_path=target))
    except (MlflowException, OSError) as e:
        raise FiresightError(redact(f"{ref}: cannot download from {where}: {' '.join(str(e).split())[:300]}")) from None
    metrics = {k: float(v) for k, v in version.tags.items() if k.startswith("test_")}
    return LoadedModel(_describer(path, engine), ref, f"{name}/{version.version}", metrics)


def registry_version_of(digest: str, name: str, tracking_uri: str | None = None) -> str | None:
    """"name/version" of the registered version whose weights digest is `digest` (the newest if several), or None."""
    use_tracking(tracking_uri)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        versions = MlflowClient().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    matching = [int(v.version) for v in versions if v.tags.get(DIGEST_KEY) == digest]
    return f"{name}/{max(matching)}" if matching else None
