"""Run by tests/test_two_nodes.py in a process of its own: a Ray cluster of two nodes on loopback (1 CPU each, custom
resources `node_a`/`node_b`), a 2-worker Ray Train job whose images and checkpoints are on S3, then the Ray Data
embedding of those images with the trained model on 2 actors. Prints one JSON line: the nodes, where each training
worker and embedding actor ran, and how far the distributed descriptors are from the single-process ones.

    python -m tests.two_node_job JOB.json   # {"train": [[uri, label], ...], "val": [...], "storage": "s3://...", "out": dir}
"""

import json
import socket
import sys
from pathlib import Path

from components.distributed import Cluster, ensure_ray, run_training  # before ray: loopback for every node
import numpy as np
import ray
from ray.cluster_utils import Cluster as LocalNodes
from ray.util.state import list_actors

from components.models.net import load_net
from components.models.spec import NetSpec
from components.registry import Spec
from components.search.embed import embed_images
from components.search.ray_embed import embed_with_ray
from components.training.jobs import LabelledImages, Optimisation, RetrievalJob, RetrievalValSet
from components.training.retrieval import train_retrieval


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    nodes = LocalNodes(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node_a": 1}, "node_ip_address": "127.0.0.1", "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})  # 8265 may be another Ray's (the tests')
    nodes.add_node(num_cpus=1, resources={"node_b": 1}, node_ip_address="127.0.0.1")
    nodes.wait_for_nodes()
    ensure_ray(nodes.address)
    node_ids = {n["NodeID"]: next(k for k in n["Resources"] if k.startswith("node_")) for n in ray.nodes() if n["Alive"]}

    train, val = spec["train"], spec["val"]
    job = RetrievalJob(
        net=NetSpec("tf_efficientnet_lite0", "gem", 3.0, 64, None, frozen_stages=5),
        optim=Optimisation(epochs=1, batch_size=4, lr=0.05, momentum=0.9, weight_decay=0.0, lr_step_epochs=10,
                           lr_gamma=0.1, train_max_side=(48, 64), hflip=True, seed=0),
        train=LabelledImages([u for u, _ in train], [l for _, l in train]),
        retrieval_val=RetrievalValSet([u for u, _ in val], [l for _, l in val], [i % 6 < 2 for i in range(len(val))]),
        criterion=Spec("double_margin_contrastive", {"pos_margin": 0.1, "neg_margin": 1.5, "squared": True}),
        sampler=Spec("random_pairs", {"pos_per_class": 4, "neg_per_class": 4, "redraw_every": 1}))
    out = run_training(train_retrieval, job, name="two-nodes", output_dir=Path(spec["out"]),
                       cluster=Cluster(2, 1, False, spec["storage"], address=nodes.address))
    workers = [a.node_id for a in list_actors(detail=True, limit=1000) if a.class_name == "RayTrainWorker"]

    net = load_net(out / "best.pt")
    uris = [u for u, _ in train + val]
    got = embed_with_ray(net, uris, batch_size=4, actors=2)
    embedders = [a.node_id for a in list_actors(detail=True, limit=1000) if "MapWorker" in a.class_name]
    _, single = embed_images(net, uris, batch_size=4)
    print(json.dumps({
        "nodes": sorted(node_ids.values()),
        "train_workers": sorted(node_ids.get(n, n) for n in workers),
        "embedding_actors": sorted(node_ids.get(n, n) for n in embedders),
        "described": got.indices.tolist(), "errors": got.errors,
        "max_abs_diff": float(np.abs(got.descriptors - single).max()),
        "best_epoch": int(net.meta["best_epoch"])}))
    ray.shutdown()
    nodes.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
