"""Firesight's library: data, models, losses, training loops, search, evaluation, storage and the Ray/MLflow
integrations."""

import os

# A local Ray is one node: with Ray's "cluster" mode off its node IP stays on loopback, so GCS, raylet, workers and
# agents listen on 127.0.0.1 only (without it `_node_ip_address="127.0.0.1"` is turned into the routable IP and they
# listen on all interfaces). Ray reads this once, when it is first imported — hence here, before any Firesight
# module imports it; joining a cluster (RAY_ADDRESS) needs it on. components.distributed.ensure_ray checks it held.
if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
