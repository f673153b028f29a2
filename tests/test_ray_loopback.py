"""A local Ray started by Firesight listens on loopback only: every TCP server of its processes (GCS, raylet,
workers, agents, dashboard) is bound to 127.0.0.1."""

import ipaddress

import psutil
import pytest

pytestmark = pytest.mark.slow


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def test_local_ray_listens_on_loopback_only(ray_local):
    import ray

    @ray.remote
    def pid() -> int:
        import os

        return os.getpid()

    worker = ray.get(pid.remote())  # a worker process exists and has its own server
    ours = {p.pid: p.name() for p in psutil.Process().children(recursive=True)}
    assert worker in ours
    listening = [(ours[c.pid], c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    names = {name for name, _, _ in listening}
    assert "gcs_server" in names and "raylet" in names, f"Ray's servers not found among {sorted(names)}"
    public = [entry for entry in listening if not _loopback(entry[1])]
    assert not public, f"Ray processes listening beyond loopback: {public}"
