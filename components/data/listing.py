"""Listing a source: the files of a folder of class folders, an s3:// prefix of class prefixes, or a CSV listing,
each with its class."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from components.errors import DataError
from components.storage import is_remote, list_files


@dataclass(frozen=True)
class SourceFile:
    """One input file and its class; `label` is None for a file outside any class folder."""

    path: str
    label: str | None



def list_class_folder(root: Path | str) -> list[SourceFile]:
    """Every file under `root` (a folder or an s3:// prefix), sorted by path; each sub-folder is a class,
    searched recursively.

    Hidden files are listed like any other. Files directly under `root`, or under a hidden top-level folder,
    get `label=None` (they are not in a class folder). Paths keep `root`'s form (relative stays relative).
    """
    if is_remote(root):
        return _list_class_prefix(str(root))
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    files: list[SourceFile] = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            label = None if entry.name.startswith(".") else entry.name
            files += [SourceFile(str(p), label) for p in _walk_files(entry)]
        else:
            files.append(SourceFile(str(entry), None))
    return sorted(files, key=lambda s: s.path)


def _list_class_prefix(root: str) -> list[SourceFile]:
    prefix = root.rstrip("/") + "/"
    uris = list_files(prefix)
    if not uris:
        raise DataError(f"{root}: no objects under this S3 prefix")
    files = []
    for uri in uris:
        top, *rest = uri[len(prefix):].split("/")
        files.append(SourceFile(uri, top if rest and not top.startswith(".") else None))
    return files


def _walk_files(folder: Path) -> list[Path]:
    """All non-folder entries below `folder` (symlinked folders followed once); unreadable folders are an error."""

    def fail(err: OSError) -> None:
        raise DataError(f"{err.filename}: cannot list folder: {err.strerror or err}")

    seen: set[str] = set()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=fail, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        found += [Path(dirpath, name) for name in filenames]
    return sorted(found)


def read_listing_csv(csv_path: Path | str) -> list[SourceFile]:
    """Read a CSV listing with a header `path,label` (extra columns ignored).

    Relative paths are resolved against the CSV's folder. A missing column, a wrong field count, an empty path
    or an empty label is a `DataError` naming the file and line.
    """
    csv_path = Path(csv_path)
    base = csv_path.parent
    files: list[SourceFile] = []
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
                files.append(SourceFile(str(base / path), label))
    except OSError as e:
        raise DataError(f"{csv_path}: cannot read listing: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not UTF-8 text: {e}") from None
    except csv.Error as e:
        raise DataError(f"{csv_path}:{reader.line_num}: malformed CSV: {e}") from None
    return files
