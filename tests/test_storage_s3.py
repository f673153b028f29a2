"""S3 through components.storage against real endpoints on 127.0.0.1: a moto S3 server, a server that answers
503 to everything, a socket that never answers, a closed port, and moto enforcing credentials."""

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import torch
import yaml

from components import storage
from components.data.images import load_rgb
from components.data.ingest import NOT_IN_CLASS_FOLDER, ingest
from components.data.listing import list_class_folder
from components.errors import WeightsError
from components.models.backbones import create_backbone
from components.storage import StorageError, read_bytes
from tests.conftest import (
    INGEST_CAPS,
    REPO,
    S3_TEST_CREDENTIALS,
    free_port,
    tiny_sample,
)

SECRET = "wrong-secret-Zq8xV3"


@pytest.fixture
def s3(s3_env):
    import boto3

    client = boto3.client("s3")
    yield client
    for bucket in client.list_buckets()["Buckets"]:
        for obj in client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            client.delete_object(Bucket=bucket["Name"], Key=obj["Key"])
        client.delete_bucket(Bucket=bucket["Name"])


@pytest.fixture
def fresh_s3_client():
    """storage's s3fs filesystem is rebuilt for this test (it reads endpoint, credentials and timeouts once)."""
    storage._S3_BY_PID.clear()
    yield
    storage._S3_BY_PID.clear()


def test_weights_load_from_s3_uri(s3, tmp_path, fresh_s3_client):
    s3.create_bucket(Bucket="models")
    source = create_backbone("tf_efficientnet_lite0", None).module
    torch.save(source.state_dict(), tmp_path / "w.pth")
    s3.upload_file(str(tmp_path / "w.pth"), "models", "lite0/w.pth")
    loaded = create_backbone("tf_efficientnet_lite0", "s3://models/lite0/w.pth").module
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(WeightsError, match="s3://models/nope.pth"):
        create_backbone("tf_efficientnet_lite0", "s3://models/nope.pth")


def test_ingest_reads_a_bucket_of_class_folders(s3, tmp_path, fresh_s3_client):
    rows = tiny_sample(tmp_path / "raw", classes=3, per_class=4)
    s3.create_bucket(Bucket="raw")
    for path, label in rows:
        s3.upload_file(path, "raw", f"photos/{label}/{Path(path).name}")
    s3.put_object(Bucket="raw", Key="photos/stray.jpg", Body=Path(rows[0][0]).read_bytes())

    listed = list_class_folder("s3://raw/photos").files
    result = ingest(listed, source="s3://raw/photos", exclude_classes=[], max_images_per_class=None, min_side=16,
                    workers=2, seed=0, progress=False, **INGEST_CAPS)

    manifest = result.manifest
    assert len(manifest) == len(rows) and set(manifest["label"]) == {label for _, label in rows}
    assert all(u.startswith("s3://raw/photos/") for u in manifest["uri"])
    local = {f"s3://raw/photos/{label}/{Path(path).name}": hashlib.sha256(Path(path).read_bytes()).hexdigest()
             for path, label in rows}
    assert dict(zip(manifest["uri"], manifest["id"])) == local
    assert result.report["quarantine"] == [{"file": "s3://raw/photos/stray.jpg", "reason": NOT_IN_CLASS_FOLDER}]
    assert load_rgb(manifest["uri"].iloc[0]).mode == "RGB"


class _Unavailable(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        body = b"" if self.command == "HEAD" else b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def broken_endpoint(request, monkeypatch, fresh_s3_client):
    """An endpoint that is down (closed port), refusing (503) or hanging (accepts, never answers)."""
    kind = request.param
    monkeypatch.setattr(storage, "S3_READ_TIMEOUT", 1.0)
    monkeypatch.setattr(storage, "S3_CONNECT_TIMEOUT", 1.0)
    closers = []
    if kind == "down":
        url = f"http://127.0.0.1:{free_port()}"
    elif kind == "refusing":
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        closers.append(server.shutdown)
        url = f"http://127.0.0.1:{server.server_address[1]}"
    else:
        sink = socket.socket()
        sink.bind(("127.0.0.1", 0))
        sink.listen(64)
        closers.append(sink.close)
        url = f"http://127.0.0.1:{sink.getsockname()[1]}"
    for key, value in {"AWS_ENDPOINT_URL": url, **S3_TEST_CREDENTIALS}.items():
        monkeypatch.setenv(key, value)
    yield kind, url
    for close in closers:
        close()


@pytest.mark.parametrize("broken_endpoint", ["down", "refusing", "hanging"], indirect=True)
def test_a_failing_endpoint_is_one_bounded_error_naming_it(broken_endpoint):
    kind, url = broken_endpoint
    expected = {"down": "endpoint unreachable", "refusing": "the endpoint refused the request (HTTP 503", "hanging": "no answer after 3 attempts"}
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        read_bytes("s3://data/cat/1.jpg")
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert message.startswith(f"cannot read s3://data/cat/1.jpg at {url}: {expected[kind]}"), message
    assert "\n" not in message
    assert elapsed < 30, f"{kind}: took {elapsed:.0f} s"


def _stage(cwd: Path, module: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run([sys.executable, "-m", module], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**clean, "PYTHONPATH": str(REPO), **env})


def _params(tmp_path: Path, source: str) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["source"] = source
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_scan_stage_with_the_endpoint_down_exits_with_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    done = _stage(_params(tmp_path, "s3://raw/photos"), "pipelines.scan",
                  {"AWS_ENDPOINT_URL": url, **S3_TEST_CREDENTIALS, "AWS_SECRET_ACCESS_KEY": SECRET})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"firesight scan: error: cannot list s3://raw/photos at {url}: "
                                   "endpoint unreachable (connection refused or reset) after 3 attempts")
    assert SECRET not in done.stdout + done.stderr


@pytest.fixture
def s3_with_auth(s3_server, s3, monkeypatch):
    """moto checks every request's signature against an IAM user's key; yields (key id, secret)."""
    import boto3

    iam = boto3.client("iam")
    iam.create_user(UserName="firesight")
    iam.put_user_policy(UserName="firesight", PolicyName="s3", PolicyDocument=(
        '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'))
    key = iam.create_access_key(UserName="firesight")["AccessKey"]
    s3.create_bucket(Bucket="raw")
    s3.put_object(Bucket="raw", Key="photos/cat/1.jpg", Body=b"x")
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    yield key["AccessKeyId"], key["SecretAccessKey"]
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()
    iam.delete_access_key(UserName="firesight", AccessKeyId=key["AccessKeyId"])
    iam.delete_user_policy(UserName="firesight", PolicyName="s3")
    iam.delete_user(UserName="firesight")


def test_bad_credentials_are_a_clear_error_that_never_prints_the_secret(tmp_path, s3_server, s3_with_auth, monkeypatch,
                                                                       fresh_s3_client):
    key_id, secret = s3_with_auth
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    assert [uri for uri, _, _ in storage.list_objects("s3://raw/photos")] == ["s3://raw/photos/cat/1.jpg"], \
        "the right key is accepted"

    done = _stage(_params(tmp_path, "s3://raw/photos"), "pipelines.scan",
                  {"AWS_ENDPOINT_URL": s3_server, **S3_TEST_CREDENTIALS, "AWS_ACCESS_KEY_ID": key_id,
                   "AWS_SECRET_ACCESS_KEY": SECRET})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"firesight scan: error: cannot list s3://raw/photos at {s3_server}: "
                                   "authentication failed (SignatureDoesNotMatch): the endpoint rejected the "
                                   "credentials (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    assert SECRET not in done.stdout + done.stderr


@pytest.mark.parametrize("port", ["closed", "not-a-port"])
def test_credentials_in_the_endpoint_url_never_reach_the_message(port, monkeypatch, fresh_s3_client):
    address = f"127.0.0.1:{free_port() if port == 'closed' else port}"
    for key, value in {"AWS_ENDPOINT_URL": f"http://minio:{SECRET}@{address}", **S3_TEST_CREDENTIALS}.items():
        monkeypatch.setenv(key, value)
    assert storage.s3_endpoint() == f"http://***@{address}"
    with pytest.raises(StorageError) as err:
        read_bytes("s3://data/cat/1.jpg")
    assert str(err.value) == (f"cannot read s3://data/cat/1.jpg at http://***@{address}: the endpoint URL carries "
                              "credentials (user:password@), which S3 does not use: set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY instead")


def test_an_unclassified_failure_naming_the_endpoint_is_redacted(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    with pytest.raises(StorageError) as err, storage.s3_errors("list", "s3://raw"):
        raise RuntimeError(f"proxy http://proxy-user:{SECRET}@10.0.0.1:3128 refused the tunnel")
    assert str(err.value) == ("cannot list s3://raw at http://127.0.0.1:9000: RuntimeError: proxy "
                              "http://***@10.0.0.1:3128 refused the tunnel")
