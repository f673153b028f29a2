"""The model registry: a registered version loads back through MLflow and embeds images as the checkpoint does,
its code is logged as source (nothing pickled), and the champion alias moves only to a better version."""

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from components.data.transforms import BatchTransform
from components.models.net import RetrievalNet, load_net, save_checkpoint
from components.tracking import register_model


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = RetrievalNet.create("tf_efficientnet_lite0", "gem", image_size=64, weights=None).eval()
    save_checkpoint(tmp_path / "best.pt", net, {"stage": "test"})
    return tmp_path / "best.pt"


def test_registered_model_loads_as_code_and_embeds_like_the_checkpoint(checkpoint: Path, tmp_path: Path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("registry-test", (tmp_path / "artifacts").as_uri()))
    images = np.random.default_rng(0).integers(0, 256, size=(2, 50, 70, 3), dtype=np.uint8)
    outcomes = []
    for value in (0.5, 0.4, 0.6):  # the alias goes to the first, stays on a worse one, moves to a better one
        with mlflow.start_run():
            outcomes.append(register_model(checkpoint=checkpoint, example_image=images[0], name="firesight-test",
                                           alias="champion", metric="test_map", value=value, tags={"backbone": "lite0"}))
    assert [(o.version, o.champion) for o in outcomes] == [("1", True), ("2", False), ("3", True)]
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("firesight-test", "champion").version) == "3"

    local = Path(mlflow.artifacts.download_artifacts("models:/firesight-test@champion", dst_path=str(tmp_path / "dl")))
    files = {p.name for p in local.rglob("*")}
    assert "python_model.pkl" not in files and "registry_model.py" in files  # logged as code, never unpickled

    model = mlflow.pyfunc.load_model("models:/firesight-test@champion")
    got = model.predict(images)
    net = load_net(checkpoint)
    batch, = BatchTransform.for_eval(net.meta)([(Image.fromarray(img),) for img in images])
    with torch.no_grad():
        expected = net(batch).numpy()
    assert got.shape == (2, 1280)
    np.testing.assert_allclose(got, expected, atol=1e-5)
