"""Listing a source: the files of a folder of class folders, an s3:// prefix of class prefixes, or a CSV listing,
each with its class — and what was left out of the listing and why.

`fingerprint` turns a listing into a table with each file's content hash (sha256 of a local file, the ETag of an
s3:// object): the `scan` stage writes it, so DVC reruns ingest when any listed image changes, whatever the source.
"""

from __future__ import annotations

import csv
import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from components.errors import DataError
from components.storage import is_remote, list_objects, object_fingerprint

LISTING_COLUMNS = ["path", "label", "bytes", "content"]
_HASH_THREADS = 4


@dataclass(frozen=True)
class SourceFile:
    """One input file and its class; `label` is None for a file outside any class folder."""

    path: str
    label: str | None


@dataclass
class Listing:
    """The files of a source and what the listing left out: `skipped` ({file, reason}: folder symlinks not
    followed, CSV rows naming one file under two labels), `empty_classes` (class folders without a file) and
    `repeated_rows` ({file, lines}: a CSV naming the same file and label more than once; listed once).
    `known` holds fingerprints the lister already had (S3 ETags from the listing call)."""

    files: list[SourceFile]
    skipped: list[dict[str, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    repeated_rows: list[dict[str, Any]] = field(default_factory=list)
    known: dict[str, tuple[int, str]] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "empty_classes": self.empty_classes, "repeated_rows": self.repeated_rows}


def list_source(source: str) -> Listing:
    """List `source`: an s3:// prefix or a folder of class folders, or a .csv listing."""
    if is_remote(source):
        return list_class_folder(source)
    path = Path(source)
    if path.is_dir():
        return list_class_folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_listing_csv(path)
    if not path.exists():
        raise DataError(f"ingest.source: {path} does not exist")
    raise DataError(f"ingest.source: {path} is neither a folder of class folders nor a .csv listing")


def list_class_folder(root: Path | str) -> Listing:
    """Every file under `root` (a folder or an s3:// prefix), sorted by path; each sub-folder is a class,
    searched recursively.

    Hidden files are listed like any other. Files directly under `root`, or under a hidden top-level folder,
    get `label=None` (they are not in a class folder). Paths keep `root`'s form (relative stays relative).
    Folder symlinks are never followed (one pointing back into the source would list it again under another
    class, one pointing out of it would widen it): each is reported in `skipped`. File symlinks are read.
    """
    if is_remote(root):
        return _list_class_prefix(str(root))
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    listing = Listing(files=[])
    for entry in sorted(root.iterdir()):
        if entry.is_symlink() and entry.is_dir():
            listing.skipped.append(_skipped_link(entry))
        elif entry.is_dir():
            label = None if entry.name.startswith(".") else entry.name
            found = _walk_files(entry, listing.skipped)
            if not found and label is not None:
                listing.empty_classes.append(label)
            listing.files += [SourceFile(str(p), label) for p in found]
        else:
            listing.files.append(SourceFile(str(entry), None))
    listing.files.sort(key=lambda s: s.path)
    listing.skipped.sort(key=lambda s: s["file"])
    return listing


def _list_class_prefix(root: str) -> Listing:
    prefix = root.rstrip("/") + "/"
    objects = list_objects(prefix)
    if not objects:
        raise DataError(f"{root}: no objects under this S3 prefix")
    listing = Listing(files=[])
    for uri, size, fingerprint in objects:
        top, *rest = uri[len(prefix):].split("/")
        listing.files.append(SourceFile(uri, top if rest and not top.startswith(".") else None))
        listing.known[uri] = (size, fingerprint)
    return listing


def _skipped_link(path: Path) -> dict[str, str]:
    return {"file": str(path), "reason": f"folder symlink not followed (-> {os.readlink(path)})"}


def _walk_files(folder: Path, skipped: list[dict[str, str]]) -> list[Path]:
    """All non-folder entries below `folder`, not entering folder symlinks (appended to `skipped`); an
    unreadable folder is an error."""

    def fail(err: OSError) -> None:
        raise DataError(f"{err.filename}: cannot list folder: {err.strerror or err}")

    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=fail):
        skipped += [_skipped_link(Path(dirpath, d)) for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        found += [Path(dirpath, name) for name in filenames]
    return sorted(found)


def read_listing_csv(csv_path: Path | str) -> Listing:
    """Read a CSV listing with a header `path,label` (extra columns ignored).

    Relative paths are resolved against the CSV's folder; s3:// URIs are kept. A missing column, a wrong field
    count, an empty path or an empty label is a `DataError` naming the file and line. A file listed again with
    the same label is listed once and reported in `repeated_rows`; one listed under two labels is left out and
    reported in `skipped`.
    """
    csv_path = Path(csv_path)
    base = csv_path.parent
    rows: dict[str, list[tuple[int, str]]] = {}  # path -> [(line, label)]
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, skipinitialspace=True)
            columns = [c.strip() for c in next(reader, [])]
            missing = [c for c in ("path", "label") if c not in columns]
            if missing:
                raise DataError(
                    f"{csv_path}:1: missing column(s) {', '.join(missing)}: expected a header line 'path,label', "
                    f"got {','.join(columns) or 'an empty file'!r}"
                )
            i_path, i_label = columns.index("path"), columns.index("label")
            for row in reader:
                where = f"{csv_path}:{reader.line_num}"
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(columns):
                    raise DataError(f"{where}: expected {len(columns)} fields ({','.join(columns)}), got {len(row)}")
                path, label = row[i_path], row[i_label].strip()
                if not path.strip():
                    raise DataError(f"{where}: empty path")
                if not label:
                    raise DataError(f"{where}: empty label for {path}")
                resolved = path if is_remote(path) else os.path.normpath(base / path)
                rows.setdefault(resolved, []).append((reader.line_num, label))
    except OSError as e:
        raise DataError(f"{csv_path}: cannot read listing: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not UTF-8 text: {e}") from None
    except csv.Error as e:
        raise DataError(f"{csv_path}:{reader.line_num}: malformed CSV: {e}") from None
    listing = Listing(files=[])
    for path, entries in rows.items():
        labels = sorted({label for _, label in entries})
        if len(labels) > 1:
            where = ", ".join(f"{label} (line {line})" for line, label in entries)
            listing.skipped.append({"file": path, "reason": f"listed under different labels: {where}"})
            continue
        listing.files.append(SourceFile(path, labels[0]))
        if len(entries) > 1:
            listing.repeated_rows.append({"file": path, "lines": [line for line, _ in entries]})
    return listing


def fingerprint(listing: Listing) -> pd.DataFrame:
    """One row per listed file, sorted by path: path, label, bytes and `content` — "sha256:<hex>" of a local
    file, "etag:<etag>" of an s3:// object, or why it could not be read ("missing", "unreadable: ...")."""

    def row(source: SourceFile) -> dict[str, Any]:
        size, content = listing.known.get(source.path) or _fingerprint_file(source.path)
        return {"path": source.path, "label": source.label, "bytes": size, "content": content}

    with ThreadPoolExecutor(_HASH_THREADS) as pool:  # hashing releases the GIL
        rows = list(pool.map(row, sorted(listing.files, key=lambda s: s.path)))
    return pd.DataFrame(rows, columns=LISTING_COLUMNS).astype({"bytes": "int64"})


def _fingerprint_file(path: str) -> tuple[int, str]:
    if is_remote(path):
        return object_fingerprint(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read
            return 0, "not a regular file"
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return size, "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return 0, "missing"
    except OSError as e:
        return 0, f"unreadable: {e.strerror or e}"


def sources(table: pd.DataFrame) -> list[SourceFile]:
    """The listed files of a `fingerprint` table."""
    return [SourceFile(path, None if pd.isna(label) else label) for path, label in zip(table["path"], table["label"])]
