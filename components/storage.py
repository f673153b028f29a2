"""Storage: every location Firesight reads is a URI — a local path or s3://bucket/key — and every output it writes
is written atomically (a temporary name in the target folder, renamed into place when complete).

S3 goes through s3fs (botocore underneath): the endpoint and credentials come from the environment
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...) or the git-ignored AWS config files,
never from params. Every request has a connect and a read timeout and `S3_ATTEMPTS` attempts with backoff; after
that one `StorageError` line names the operation, the object and the endpoint — never a credential.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import pandas as pd

from components.errors import DataError, FiresightError
from components.redact import redact

S3_CONNECT_TIMEOUT = 5.0  # seconds to open a connection
S3_READ_TIMEOUT = 30.0  # seconds without a byte from the endpoint
S3_ATTEMPTS = 3  # per request (botocore "standard" retries: connection errors, timeouts, 5xx, throttling)
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
               "InvalidClientTokenId", "AuthorizationHeaderMalformed", "403"}


class StorageError(FiresightError):
    """The storage endpoint is unreachable, refuses the request or rejects the credentials."""


@contextmanager
def atomic_write_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it to `path`, on failure remove it.

    The temporary name keeps `path`'s suffix, so writers that infer a format from the extension still work.
    The parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path | str, obj: Any) -> None:
    """Write `obj` as indented UTF-8 JSON, atomically."""
    with atomic_write_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_parquet(path: Path | str, df: pd.DataFrame) -> None:
    """Write `df` (without its index) as Parquet, atomically."""
    with atomic_write_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def read_parquet(path: Path | str) -> pd.DataFrame:
    """Read a Parquet file; a missing or unreadable file is a `DataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None


def read_json(path: Path | str) -> Any:
    """Read a local JSON file; a missing or malformed file is a `DataError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON file: {e}") from None


def is_remote(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def _endpoint_url() -> str:
    """The S3 endpoint URL the environment sets ("" for AWS's own)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def s3_endpoint() -> str:
    """The S3 endpoint requests go to, for messages (credentials in its URL redacted)."""
    return redact(_endpoint_url()) or "the AWS default S3 endpoint"


_S3_BY_PID: dict[int, Any] = {}


def s3_filesystem():
    """This process's s3fs filesystem: Firesight's timeouts, botocore's standard retries (`S3_ATTEMPTS` per
    request) and no second retry layer in s3fs, so a dead endpoint fails in seconds, never hangs."""
    fs = _S3_BY_PID.get(os.getpid())  # one per process: a forked child must not reuse its parent's event loop
    if fs is None:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={
            "connect_timeout": S3_CONNECT_TIMEOUT,
            "read_timeout": S3_READ_TIMEOUT,
            "retries": {"total_max_attempts": S3_ATTEMPTS, "mode": "standard"},
        })
        fs.retries = 1
        _S3_BY_PID.clear()
        _S3_BY_PID[os.getpid()] = fs
    return fs


def arrow_filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) for libraries that take one (Ray Train's `storage_filesystem`): S3 with the same
    endpoint, timeouts and attempts as `s3_filesystem`, or the local filesystem."""
    from pyarrow import fs

    if not is_remote(uri):
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    endpoint = urlsplit(_endpoint_url())
    s3 = fs.S3FileSystem(
        endpoint_override=endpoint.netloc or None, scheme=endpoint.scheme or "https",
        region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
        connect_timeout=S3_CONNECT_TIMEOUT, request_timeout=S3_READ_TIMEOUT,
        retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
    )
    return s3, uri.removeprefix("s3://").rstrip("/")


@contextmanager
def s3_errors(operation: str, uri: str) -> Iterator[None]:
    """Turn a failure of an S3 call into one `StorageError` line naming `operation`, `uri` and the endpoint (never
    a credential); a missing object stays a FileNotFoundError."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as e:  # botocore, aiohttp and s3fs raise many types; classify by what they mean
        raise StorageError(f"cannot {operation} {uri} at {s3_endpoint()}: {_explain(e)}") from None


def _explain(e: BaseException) -> str:
    import botocore.exceptions as bx

    if urlsplit(_endpoint_url()).username is not None:  # every request fails, whatever the error says
        return ("the endpoint URL carries credentials (user:password@), which S3 does not use: set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead")
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in chain:
        if isinstance(err, bx.NoCredentialsError):
            return "no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        if isinstance(err, bx.ClientError):
            error = err.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _AUTH_CODES or status == 403:
                return (f"authentication failed ({code or status}): the endpoint rejected the credentials "
                        "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
            if status >= 500:
                detail = f" {code}" if code and code != str(status) else ""
                return f"the endpoint refused the request (HTTP {status}{detail}) {S3_ATTEMPTS} times"
            return f"{code or status}: {error.get('Message', '')}".strip()
        if isinstance(err, bx.ConnectTimeoutError | bx.ReadTimeoutError | TimeoutError):
            return (f"no answer after {S3_ATTEMPTS} attempts ({S3_CONNECT_TIMEOUT:g} s to connect, "
                    f"{S3_READ_TIMEOUT:g} s to read each)")
        if isinstance(err, bx.ConnectionError | ConnectionError):
            return f"endpoint unreachable (connection refused or reset) after {S3_ATTEMPTS} attempts"
    return redact(f"{type(chain[0]).__name__}: {chain[0]}")


@contextmanager
def open_input(uri: str | Path) -> Iterator[IO[bytes]]:
    """A binary file object reading a local path or an s3:// object (FileNotFoundError if it does not exist)."""
    uri = str(uri)
    if not is_remote(uri):
        with open(uri, "rb") as f:
            yield f
        return
    with s3_errors("read", uri):
        data = s3_filesystem().cat_file(uri)
    yield io.BytesIO(data)


def read_bytes(uri: str | Path) -> bytes:
    """The bytes of a local file or an s3:// object; a missing or unreadable one is a `DataError` naming it, an
    unreachable endpoint or rejected credentials a `StorageError`."""
    try:
        with open_input(uri) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{uri}: not found") from None
    except OSError as e:
        raise DataError(f"cannot read {uri}: {e.strerror or e}") from None


def list_objects(uri: str) -> list[tuple[str, int, str]]:
    """Every object under an s3:// prefix (recursively), sorted: (s3:// URI, size, "etag:<ETag>")."""
    prefix = uri.rstrip("/")
    with s3_errors("list", prefix):
        found = s3_filesystem().find(prefix, detail=True)
    return sorted((f"s3://{key}", int(info["size"]), _etag(info)) for key, info in found.items())


def object_fingerprint(uri: str) -> tuple[int, str]:
    """(size, "etag:<ETag>") of one s3:// object; (0, "missing") if there is none."""
    with s3_errors("stat", uri):
        try:
            info = s3_filesystem().info(uri)
        except FileNotFoundError:
            return 0, "missing"
    return int(info["size"]), _etag(info)


def _etag(info: dict[str, Any]) -> str:
    return "etag:" + str(info.get("ETag") or info.get("etag") or "").strip('"')


def remove_tree(uri: str) -> None:
    """Delete a local folder or everything under an s3:// prefix; a missing one is fine."""
    if not is_remote(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    with s3_errors("delete", uri):
        try:
            s3_filesystem().rm(uri.rstrip("/"), recursive=True)
        except FileNotFoundError:
            pass
