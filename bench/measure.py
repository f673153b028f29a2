"""What every measurement records (when, how loaded the machine was, how long), throughput of interleaved
rivals, peak memory of a process tree, and goals marked met or not."""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psutil

MEMORY_POLL_SECONDS = 0.5
MIN_TIMED_SECONDS = 1.0
PSS_POLL_SECONDS = 2.0


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@contextmanager
def measured() -> Iterator[dict[str, Any]]:
    """A record with the start and end time, the 1/5/15-min load average at both, and the wall time in seconds;
    the body adds its own figures to it."""
    record: dict[str, Any] = {"started": now(), "loadavg_start": load_average()}
    start = time.perf_counter()
    yield record
    record.update(wall_seconds=round(time.perf_counter() - start, 3), ended=now(), loadavg_end=load_average())


def interleaved_rates(rivals: dict[str, Callable[[], None]], work: float, rounds: int,
                      min_seconds: float = MIN_TIMED_SECONDS) -> dict[str, dict[str, Any]]:
    """Run each rival in turn, round after round (A B A B ...), so load that comes and goes hits both alike.

    `work` is the amount one call does (images, queries, samples). A call that takes less than `min_seconds` is
    repeated within each timing, the same number of times for every rival. Returns per rival the median rate
    (work/s), the rate of each round, and the timing context.
    """
    first = {}
    for name, fn in rivals.items():  # warm-up, and how many calls make a long enough timing
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    repeats = max(1, math.ceil(min_seconds / max(1e-6, min(first.values()))))
    seconds: dict[str, list[float]] = {name: [] for name in rivals}
    with measured() as record:
        for _ in range(rounds):
            for name, fn in rivals.items():
                start = time.perf_counter()
                for _ in range(repeats):
                    fn()
                seconds[name].append((time.perf_counter() - start) / repeats)
    return {name: {"rate": round(work / statistics.median(s), 3), "rates": [round(work / x, 3) for x in s],
                   "repeats": repeats, **record} for name, s in seconds.items()}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def goal(name: str, measured_value: float, target: float, unit: str = "×", higher_is_better: bool = True) -> dict:
    met = measured_value >= target if higher_is_better else measured_value <= target
    return {"goal": name, "measured": measured_value, "target": f"{'≥' if higher_is_better else '≤'} {target}{unit}",
            "met": bool(met)}


class TreeMemory:
    """Polls the memory of a process and all its descendants (Ray's raylet and workers too, when the process started
    a local Ray) in a background thread.

    Every poll sums the tree's RSS, which counts pages that processes share (libraries) once per process: an upper
    bound. When that sum reaches a new high, the tree's PSS (shared pages split between the processes that map them)
    is read too — at most every `pss_interval` s, as reading it costs more; a high reached sooner is read at the
    first poll the interval allows: `peak_pss_bytes` is the best estimate of the memory used at the peak.
    """

    def __init__(self, pid: int, interval: float = MEMORY_POLL_SECONDS, pss_interval: float = PSS_POLL_SECONDS) -> None:
        self.root = psutil.Process(pid)
        self.interval, self.pss_interval = interval, pss_interval
        self.peak_bytes = self.peak_process_bytes = self.peak_pss_bytes = 0
        self.processes_seen: set[int] = set()
        self._last_pss = float("-inf")
        self._pss_due = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> None:
        sizes = {}
        for p in self._tree():
            try:
                sizes[p] = p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        if not sizes:
            return
        self.processes_seen.update(p.pid for p in sizes)
        self.peak_process_bytes = max(self.peak_process_bytes, max(sizes.values()))
        total = sum(sizes.values())
        if total > self.peak_bytes:
            self.peak_bytes = total
            self._pss_due = True
        if self._pss_due and time.monotonic() - self._last_pss >= self.pss_interval:
            self._last_pss, self._pss_due = time.monotonic(), False
            self.peak_pss_bytes = max(self.peak_pss_bytes, self._pss(sizes))

    @staticmethod
    def _pss(processes: dict[psutil.Process, int]) -> int:
        total = 0
        for p in processes:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def summary(self) -> dict[str, Any]:
        return {"peak_rss_tree_mib": round(self.peak_bytes / 2**20, 1),
                "peak_pss_tree_mib": round(self.peak_pss_bytes / 2**20, 1),
                "peak_rss_largest_process_mib": round(self.peak_process_bytes / 2**20, 1),
                "processes_seen": len(self.processes_seen)}


def rss_mib() -> float:
    return round(psutil.Process().memory_info().rss / 2**20, 1)
