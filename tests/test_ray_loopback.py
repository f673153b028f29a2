"""A local Ray started by Firesight listens on loopback only: every bound inet socket (TCP or UDP) of its processes
(GCS, raylet, workers, agents, dashboard, and the workers of a Train job with its rendezvous store) is on
127.0.0.1, including servers bound late, while or after work runs."""

import ipaddress
import os
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.slow

Socket = tuple[str, str, str, int]  # process name, tcp | udp, local ip, local port


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def _ray_processes() -> dict[int, str]:
    """Ray's processes started by this driver: its children that run from the ray package, and theirs (workers,
    agents); other children of the test session (servers of other tests) are not looked at."""
    import ray

    package = str(Path(ray.__file__).parent)
    found: dict[int, str] = {}
    for child in psutil.Process().children():
        try:
            if any(package in part for part in child.cmdline()):
                for process in (child, *child.children(recursive=True)):
                    found[process.pid] = process.name()
        except psutil.NoSuchProcess:  # ended meanwhile
            pass
    return found


def _bound_sockets() -> set[Socket]:
    """Inet sockets of Ray's processes with a local address (an unbound client socket has none)."""
    processes = _ray_processes()
    return {(processes[c.pid], "udp" if c.type == socket.SOCK_DGRAM else "tcp", c.laddr.ip, c.laddr.port)
            for c in psutil.net_connections(kind="inet") if c.pid in processes and c.laddr and c.laddr.port}


def _all_reduce_once(job, ctx) -> None:
    """A Train loop that uses the process group (gloo) once and reports."""
    total = torch.ones(1)
    dist.all_reduce(total)
    assert total.item() == ctx.world_size
    ctx.report({"epoch": 0}, None)


def test_local_ray_binds_loopback_only(ray_local, tmp_path):
    import ray

    from components.distributed import Cluster, torch_trainer

    assert not os.environ.get("RAY_ADDRESS"), "the fixture's Ray is private whatever the environment says"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import pytest's module name
    seen: set[Socket] = set()
    done = threading.Event()

    def watch() -> None:  # Train workers and their servers live only while the job runs
        while not done.is_set():
            seen.update(_bound_sockets())
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        torch_trainer(_all_reduce_once, None, run_name="loopback", cluster=Cluster(2, 1, False, str(tmp_path))).fit()

        @ray.remote
        def pid() -> int:
            return os.getpid()

        assert ray.get(pid.remote()) in _ray_processes()
        stable_since, last, deadline = time.monotonic(), _bound_sockets(), time.monotonic() + 30
        while time.monotonic() - stable_since < 3 and time.monotonic() < deadline:  # late binders: until 3 s unchanged
            time.sleep(0.5)
            now = _bound_sockets()
            if now != last:
                stable_since, last = time.monotonic(), now
            seen.update(now)
    finally:
        done.set()
        watcher.join()

    names = {name for name, *_ in seen}
    assert {"gcs_server", "raylet"} <= names, f"Ray's servers not found among {sorted(names)}"
    assert any(name.startswith("ray::RayTrainWorker") for name in names), "the Train job's workers were not seen"
    public = sorted(entry for entry in seen if not _loopback(entry[2]))
    assert not public, f"Ray processes bound beyond loopback: {public}"
