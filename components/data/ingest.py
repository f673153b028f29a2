"""Ingest: list raw files with their class, decode each by content, collapse duplicates, quarantine leaks, cap.

Every file seen ends up exactly once in the manifest or in the report (quarantined, duplicate dropped, leak,
excluded class, over the per-class cap), each with a reason.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import random
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, NamedTuple

import pandas as pd
from tqdm import tqdm

from components.data.images import MAX_FILE_BYTES, MAX_PIXELS, BadImage, ImageInfo, probe_image
from components.data.listing import SourceFile
from components.errors import DataError

MANIFEST_COLUMNS = ["id", "label", "uri", "width", "height", "format", "bytes"]
NOT_IN_CLASS_FOLDER = "not inside a class folder"


@dataclass(frozen=True)
class IngestResult:
    manifest: pd.DataFrame
    report: dict[str, Any]


class _Probe(NamedTuple):
    sha256: str | None
    info: ImageInfo | None
    size: int
    reason: str | None


def ingest(
    sources: Iterable[SourceFile],
    *,
    source: str,
    exclude_classes: Iterable[str],
    max_images_per_class: int | None,
    min_side: int,
    workers: int,
    seed: int,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_pixels: int = MAX_PIXELS,
    progress: bool = True,
) -> IngestResult:
    """Decode every file (in `workers` processes), build the manifest and a report accounting for every file.

    `source` names the input in the report and errors. Within a class, exact duplicates (same SHA-256) keep the
    first path in sorted order; the same bytes under two or more classes is a leak and all copies are left out.
    Classes over `max_images_per_class` keep a random subset seeded by `seed` and the label. Files over
    `max_file_bytes` are quarantined unread, images over `max_pixels` before their pixels are decoded.
    Raises `DataError` if no image is kept.
    """
    entries = sorted(sources, key=lambda s: (s.path, s.label or ""))
    excluded = set(exclude_classes)
    excluded_counts = dict.fromkeys(sorted(excluded), 0)
    quarantine: list[dict[str, str]] = []
    to_decode: list[SourceFile] = []
    for s in entries:
        if s.label is None:
            quarantine.append({"file": s.path, "reason": NOT_IN_CLASS_FOLDER})
        elif s.label in excluded:
            excluded_counts[s.label] += 1
        else:
            to_decode.append(s)

    probe_file = functools.partial(_probe, min_side=min_side, max_bytes=max_file_bytes, max_pixels=max_pixels)
    by_sha: dict[str, list[tuple[SourceFile, _Probe]]] = {}
    for s, probe in zip(to_decode, _probe_all([s.path for s in to_decode], probe_file, workers, progress)):
        if probe.reason is not None:
            quarantine.append({"file": s.path, "reason": probe.reason})
        else:
            by_sha.setdefault(probe.sha256, []).append((s, probe))

    duplicates: list[dict[str, Any]] = []
    leaks: list[dict[str, Any]] = []
    by_label: dict[str, list[dict[str, Any]]] = {}
    for sha, copies in by_sha.items():
        if len({s.label for s, _ in copies}) > 1:
            leaks.append({"sha256": sha, "files": [{"file": s.path, "label": s.label} for s, _ in copies]})
            continue
        (first, probe), *rest = copies
        if rest:
            duplicates.append({"label": first.label, "kept": first.path, "dropped": [s.path for s, _ in rest]})
        by_label.setdefault(first.label, []).append(
            {"id": sha, "label": first.label, "uri": first.path, "width": probe.info.width,
             "height": probe.info.height, "format": probe.info.format, "bytes": probe.size}
        )

    rows: list[dict[str, Any]] = []
    over_cap: dict[str, dict[str, Any]] = {}
    for label in sorted(by_label):
        items = sorted(by_label[label], key=lambda r: r["uri"])
        if max_images_per_class is not None and len(items) > max_images_per_class:
            keep = set(random.Random(f"{seed}/{label}").sample(range(len(items)), max_images_per_class))
            over_cap[label] = {"kept": max_images_per_class,
                               "left_out": [r["uri"] for i, r in enumerate(items) if i not in keep]}
            items = [r for i, r in enumerate(items) if i in keep]
        rows += items

    n_excluded = sum(excluded_counts.values())
    n_leaked = sum(len(leak["files"]) for leak in leaks)
    if not rows:
        first = f"; first problem: {quarantine[0]['file']}: {quarantine[0]['reason']}" if quarantine else ""
        raise DataError(
            f"no usable images in {source}: {len(entries)} files seen, {len(quarantine)} quarantined, "
            f"{n_excluded} in excluded classes, {n_leaked} in cross-class leaks{first}"
        )
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).astype(
        {"width": "int64", "height": "int64", "bytes": "int64"}
    )
    report = {
        "source": source,
        "files_seen": len(entries),
        "images_kept": len(manifest),
        "classes": len(by_label),
        "per_class": {label: len(group) for label, group in manifest.groupby("label", sort=True)},
        "quarantine": sorted(quarantine, key=lambda q: q["file"]),
        "duplicates": sorted(duplicates, key=lambda d: (d["label"], d["kept"])),
        "leaks": sorted(leaks, key=lambda leak: leak["files"][0]["file"]),
        "excluded_classes": excluded_counts,
        "over_cap": over_cap,
    }
    return IngestResult(manifest=manifest, report=report)


def _probe(path: str, min_side: int, max_bytes: int, max_pixels: int) -> _Probe:
    """Validate one file (read once); never raises for bad input (the reason is returned instead)."""
    try:
        data, info = probe_image(path, min_side=min_side, max_bytes=max_bytes, max_pixels=max_pixels)
        return _Probe(hashlib.sha256(data).hexdigest(), info, len(data), None)
    except BadImage as e:
        return _Probe(None, None, 0, e.reason)
    except OSError as e:
        return _Probe(None, None, 0, f"unreadable: {e.strerror or e}")


def _use_environment(env: dict[str, str]) -> None:
    """Run a worker with the caller's environment (S3 endpoint and credentials included)."""
    os.environ.clear()
    os.environ.update(env)


def _probe_all(paths: list[str], probe: Callable[[str], _Probe], workers: int, progress: bool) -> list[_Probe]:
    """`probe` (picklable) each of `paths`, in order, in a pool of `workers` processes (in-process when 1), with a
    progress bar."""
    results: list[_Probe] = []
    with ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=len(paths), desc="decode", unit="file", disable=not progress))
        if workers > 1 and len(paths) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(
                max_workers=min(workers, len(paths)), mp_context=multiprocessing.get_context("forkserver"),
                initializer=_use_environment, initargs=(dict(os.environ),),  # the forkserver's may be older
            ))
            probes = pool.map(probe, paths, chunksize=max(1, min(64, len(paths) // (workers * 16))))
        else:
            probes = map(probe, paths)
        for result in probes:
            results.append(result)
            bar.update()
    return results
