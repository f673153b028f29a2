"""Weights from an s3:// URI, against a real S3 endpoint (moto server) on 127.0.0.1."""

import pytest
import torch

from components.errors import WeightsError
from components.models.backbones import create_backbone


@pytest.fixture(scope="module")
def s3_endpoint():
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket="models")
        yield boto3.client("s3")
    server.stop()


def test_weights_load_from_s3_uri(s3_endpoint, tmp_path):
    source = create_backbone("tf_efficientnet_lite0", None).module
    torch.save(source.state_dict(), tmp_path / "w.pth")
    s3_endpoint.upload_file(str(tmp_path / "w.pth"), "models", "lite0/w.pth")
    loaded = create_backbone("tf_efficientnet_lite0", "s3://models/lite0/w.pth").module
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))


def test_missing_s3_weights_is_a_clear_error(s3_endpoint):
    with pytest.raises(WeightsError, match="s3://models/nope.pth"):
        create_backbone("tf_efficientnet_lite0", "s3://models/nope.pth")
