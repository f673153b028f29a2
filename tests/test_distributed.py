"""Data-parallel training on 2 Ray Train workers over gloo: same weights on every rank, disjoint data shards."""

import json

import pytest
from components.distributed import Cluster, run_training
from components.models.net import load_net
from components.models.spec import NetSpec
from components.training.jobs import LabelledImages, Optimisation, RetrievalJob, RetrievalValSet
from components.training.retrieval import train_retrieval
from tests.conftest import contrastive, random_pairs, tiny_train_val

pytestmark = pytest.mark.slow


def _job(tmp_path, train_max_side: tuple[int, int], **retrieval) -> RetrievalJob:
    """2 epochs on 4 tiny train classes, validated on 2 held-out ones, auditing every rank."""
    train, val = tiny_train_val(tmp_path / "images")
    return RetrievalJob(
        net=NetSpec("tf_efficientnet_lite0", "gem", 3.0, 64, None, frozen_stages=5),
        optim=Optimisation(epochs=2, batch_size=4, lr=0.05, momentum=0.9, weight_decay=0.0, lr_step_epochs=10,
                           lr_gamma=0.1, train_max_side=train_max_side, hflip=True, seed=0),
        train=LabelledImages([u for u, _ in train], [l for _, l in train]),
        retrieval_val=RetrievalValSet([u for u, _ in val], [l - 4 for _, l in val], [i % 6 < 2 for i in range(len(val))]),
        audit_dir=str(tmp_path / "audit"), **retrieval)


def test_two_gloo_workers_end_identical_on_disjoint_shards(tmp_path, ray_local):
    job = _job(tmp_path, (48, 64), criterion=contrastive(0.1, 1.5), sampler=random_pairs(4, 4, 1))
    out = run_training(train_retrieval, job, name="test-ddp", cluster=Cluster(2, 1, False, str(tmp_path / "ray")),
                       output_dir=tmp_path / "model")

    rank0, rank1 = (json.loads((tmp_path / "audit" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["weights_sha256"] == rank1["weights_sha256"]
    pairs_per_epoch = 4 * (4 + 4)
    for epoch in ("1", "2"):
        shard0, shard1 = set(rank0["seen"][epoch]), set(rank1["seen"][epoch])
        assert len(shard0) == len(shard1) == pairs_per_epoch // 2
        assert shard0.isdisjoint(shard1) and shard0 | shard1 == set(range(pairs_per_epoch))

    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2] and all(0 <= h["val_map"] <= 1 for h in history)
    assert "train_loss" in history[1]
    best = load_net(out / "best.pt")
    assert best.meta["stage"] == "retrieval" and best.meta["best_epoch"] in (0, 1, 2)
    assert not (tmp_path / "ray").exists() or not any((tmp_path / "ray").iterdir()), "run storage is cleaned up"


def test_two_gloo_workers_share_the_cached_trunk(tmp_path, ray_local):
    """With the frozen trunk cached, each rank computes a shard of it: the train views are gathered (any rank may
    draw any image), val descriptors are gathered from the ranks' shards — so the starting val figure is the one a
    single process computes, and both ranks end with the same weights on disjoint P×K batches."""
    from components.registry import Spec
    from components.training.context import LocalContext

    job = _job(tmp_path, (64, 64), criterion=Spec("multi_similarity", {"alpha": 2.0, "beta": 50.0, "base": 0.5}),
               sampler=Spec("class_balanced", {"classes_per_batch": 2, "images_per_class": 3, "batches_per_epoch": 4}),
               cache_frozen_trunk=True)
    out = run_training(train_retrieval, job, name="test-ddp-cached", cluster=Cluster(2, 1, False, str(tmp_path / "ray")),
                       output_dir=tmp_path / "model")
    rank0, rank1 = (json.loads((tmp_path / "audit" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["weights_sha256"] == rank1["weights_sha256"]
    assert len(rank0["seen"]["1"]) == len(rank1["seen"]["1"]) == 2 * 2 * 3  # 2 of the 4 batches each
    history = json.loads((out / "history.json").read_text())
    single = LocalContext(tmp_path / "single")
    train_retrieval(RetrievalJob(**{**job.__dict__, "optim": Optimisation(**{**job.optim.__dict__, "epochs": 1}),
                                    "audit_dir": None}), single)
    assert history[0]["val_map"] == pytest.approx(single.reports[0]["val_map"], abs=1e-6)
    assert [h["epoch"] for h in history] == [0, 1, 2] and history[1]["train_loss"] > 0
