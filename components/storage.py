"""Storage: output files written atomically (a temporary name in the target folder, renamed into place when
complete), and reads of a local path or an s3:// URI (fsspec/s3fs; endpoint and credentials come from the
environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from components.errors import DataError


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


def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


def read_bytes(uri: str | Path) -> bytes:
    """The bytes of a local file or an s3:// object; a missing or unreadable one is a `DataError` naming it."""
    uri = str(uri)
    try:
        if is_remote(uri):
            import fsspec

            with fsspec.open(uri, "rb") as f:
                return f.read()
        return Path(uri).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{uri}: not found") from None
    except Exception as e:  # network, permissions, credentials: one line naming the object
        raise DataError(f"cannot read {uri}: {type(e).__name__}: {e}") from None
