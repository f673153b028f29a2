"""Ingest: list raw files with their class, decode each by content, collapse duplicates, quarantine leaks, cap.

Every file seen ends up exactly once in the manifest or in the report (quarantined, duplicate dropped, leak,
excluded class, over the per-class cap), each with a reason.

Files are decoded in a pool of worker processes (`workers` > 1), a few files in flight each. A worker that dies (a
decoder's segfault, the OOM killer) costs only the file it was on: the files in flight are decoded again one by
one, and one that kills its process again is quarantined with the exit code. Workers ignore Ctrl+C; the ingesting
process stops the pool without waiting for queued files and lets the KeyboardInterrupt through.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import random
import signal
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any, NamedTuple

import pandas as pd
from tqdm import tqdm

from components.data.contract import MANIFEST_COLUMNS
from components.data.images import BadImage, ImageInfo, probe_image
from components.data.listing import SourceFile
from components.errors import DataError

NOT_IN_CLASS_FOLDER = "not inside a class folder"
_IN_FLIGHT_PER_WORKER = 4  # files submitted ahead per decode worker: keeps it busy, bounds what a crash re-runs


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
    max_file_bytes: int,
    max_pixels: int,
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


def _probe_all(paths: list[str], probe: Callable[[str], _Probe], workers: int, progress: bool) -> list[_Probe]:
    """`probe` (picklable) each of `paths`, results in input order, in a pool of `workers` processes (in-process
    when 1), with a progress bar."""
    with tqdm(total=len(paths), desc="decode", unit="file", disable=not progress) as bar:
        if workers > 1 and len(paths) > 1:
            return _probe_in_pool(paths, probe, min(workers, len(paths)), bar)
        results = []
        for path in paths:
            results.append(probe(path))
            bar.update()
        return results


def _probe_in_pool(paths: list[str], probe: Callable[[str], _Probe], workers: int, bar: tqdm) -> list[_Probe]:
    """`_probe_all` in a pool of `workers` processes, with at most `_IN_FLIGHT_PER_WORKER` files each submitted.

    A worker that dies (a decoder's segfault, the OOM killer) breaks the pool: the files in flight that did not
    come back are probed again one by one (`_probe_one_by_one`), which tells the culprit, and a new pool goes on
    with the rest. On any exception, Ctrl+C included, the pool is shut down without waiting for queued files.
    """
    ctx, env = multiprocessing.get_context("forkserver"), dict(os.environ)  # the forkserver's env may be older
    results: list[_Probe | None] = [None] * len(paths)
    queue = deque(range(len(paths)))
    in_flight: dict[Future[_Probe], int] = {}
    pool = _pool(ctx, workers, env)
    try:
        while queue or in_flight:
            broken = False
            try:
                while queue and len(in_flight) < workers * _IN_FLIGHT_PER_WORKER:
                    in_flight[pool.submit(probe, paths[queue[0]])] = queue[0]
                    queue.popleft()
            except BrokenProcessPool:  # broke since the last file came back; this one was not submitted
                broken = True
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            if broken or any(_broke(f) for f in done):
                broken = True
                done, _ = wait(in_flight)  # a broken pool fails every file in flight at once
            suspects = []
            for future in done:
                i = in_flight.pop(future)
                if _broke(future):
                    suspects.append(i)
                else:
                    results[i] = future.result()
                    bar.update()
            if broken:
                pool.shutdown()
                suspects.sort()
                for i, result in zip(suspects, _probe_one_by_one(ctx, probe, [paths[i] for i in suspects], env)):
                    results[i] = result
                bar.update(len(suspects))
                pool = _pool(ctx, workers, env)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


def _pool(ctx: BaseContext, workers: int, env: dict[str, str]) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_start_worker, initargs=(env,))


def _broke(future: Future) -> bool:
    return isinstance(future.exception(), BrokenProcessPool)


def _start_worker(env: dict[str, str]) -> None:
    """Set up a decode process: Ctrl+C is left to the ingesting process (which stops the pool), and the caller's
    environment is used (S3 endpoint and credentials included)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.clear()
    os.environ.update(env)


def _probe_one_by_one(ctx: BaseContext, probe: Callable[[str], _Probe], paths: list[str],
                      env: dict[str, str]) -> list[_Probe]:
    """`probe` `paths` one at a time in a process of their own: a file during which it dies is quarantined with
    its exit code, and a new process goes on with the next file."""
    results: list[_Probe] = []
    process, conn = None, None
    try:
        for path in paths:
            if process is None:
                conn, child = ctx.Pipe()
                process = ctx.Process(target=_serve, args=(child, probe, env), daemon=True)
                process.start()
                child.close()
            conn.send(path)
            try:
                ok, value = conn.recv()
            except EOFError:  # it died on this file
                process.join()
                results.append(_Probe(None, None, 0,
                                      f"decoder crashed the worker process ({_exit_status(process.exitcode)})"))
                conn.close()
                process, conn = None, None
                continue
            if not ok:
                raise value
            results.append(value)
    finally:  # done, a probe's exception or Ctrl+C: nothing of this outlives the run
        if process is not None:
            process.kill()
            process.join()
            conn.close()
    return results


def _serve(conn: Connection, probe: Callable[[str], _Probe], env: dict[str, str]) -> None:
    """The process of `_probe_one_by_one`: for each path received, send (True, its probe) or (False, the
    exception the probe raised)."""
    _start_worker(env)
    while True:
        path = conn.recv()
        try:
            answer = (True, probe(path))
        except Exception as e:  # noqa: BLE001 - raised again by the caller, as the pool would
            answer = (False, e)
        conn.send(answer)


def _exit_status(code: int) -> str:
    """For messages: "exit code -11, SIGSEGV" for a process a signal killed, "exit code 1" otherwise."""
    if code < 0 and -code in {s.value for s in signal.Signals}:
        return f"exit code {code}, {signal.Signals(-code).name}"
    return f"exit code {code}"
