"""Each retrieval method trains for one epoch through the same loop (single process, tiny real images)."""

import json

import numpy as np
import pytest

from components.models.net import read_checkpoint
from components.models.spec import NetSpec
from components.registry import Spec
from components.training.context import LocalContext, read_train_state
from components.training.jobs import Optimisation, RetrievalJob
from components.training.retrieval import train_retrieval
from tests.conftest import contrastive, random_pairs, tiny_retrieval_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_retrieval_data(tmp_path_factory.mktemp("images"))


DOUBLE_MARGIN = contrastive(0.5, 1.2)
PAIRS = random_pairs(2, 2)
PK = Spec("class_balanced", {"classes_per_batch": 2, "images_per_class": 3})


@pytest.mark.parametrize("criterion, sampler, miner", [
    (contrastive(0.0, 1.2), PAIRS, None),                                  # retr-s: single margin
    (contrastive(0.5, 1.2, squared=False), PAIRS, None),                   # retr-d, plain hinge
    (DOUBLE_MARGIN, Spec("hard_negative_pairs", {"pos_per_class": 2, "neg_per_class": 2, "redraw_every": 1,
                                                 "pool_size": 10}), None),
    (Spec("batch_hard_triplet", {"margin": 0.1}), PK, None),
    (Spec("coupled_clusters", {"margin": 0.5}), PK, None),                 # Liu et al.: a cluster per class
    (Spec("siamese_id_verification", {"ver_weight": 1.0, "id_weight": 0.5}),
     Spec("ratio_pairs", {"pos_per_class": 2, "start": 1.0, "growth": 1.01, "max_ratio": 4.0}), None),
    (DOUBLE_MARGIN, PK, None),                                             # all pairs of each P×K batch
    (Spec("multi_similarity", {"alpha": 2.0, "beta": 50.0, "base": 0.5}), PK,  # pytorch-metric-learning's
     Spec("multi_similarity", {"epsilon": 0.1})),
    (Spec("proxy_anchor", {"margin": 0.1, "alpha": 32.0}), PK, None),
    (Spec("arcface", {"margin": 28.6, "scale": 64.0}), PAIRS, None),
], ids=lambda v: v.name if isinstance(v, Spec) else str(v))
def test_retrieval_variant_trains_one_epoch(data, tmp_path, criterion, sampler, miner):
    train, val = data
    job = RetrievalJob(
        net=NetSpec("tf_efficientnet_lite0", "gem", 3.0, 48, None, frozen_stages=6),
        optim=Optimisation(1, 4, 0.01, 0.9, 0.0, 10, 0.1, (40, 48), True, 0, rotation_degrees=5, color_jitter=0.2),
        train=train, retrieval_val=val, criterion=criterion, sampler=sampler, miner=miner,
    )
    ctx = LocalContext(tmp_path / "ckpt")
    train_retrieval(job, ctx)
    assert [r["epoch"] for r in ctx.reports] == [0, 1]
    assert np.isfinite(ctx.reports[1]["train_loss"]) and 0 < ctx.reports[1]["val_map"] <= 1
    state = read_train_state(ctx.latest_checkpoint())
    own = {"siamese_id_verification": "loss.verification", "proxy_anchor": "loss.proxies", "arcface": "loss.W"}
    if criterion.name in own:  # the loss's own parameters are trained and checkpointed with the net
        assert any(k.startswith(own[criterion.name]) for k in state["model"])
    history = json.loads((ctx.latest_checkpoint() / "history.json").read_text())
    assert len(history) == 2
    meta = read_checkpoint(ctx.latest_checkpoint() / "best.pt")["meta"]
    assert meta["criterion"] == {"name": criterion.name, "args": dict(criterion.args)}
    assert meta["sampler"]["name"] == sampler.name and (meta["miner"] or {}).get("name") == (miner and miner.name)


def test_a_job_restored_after_its_last_epoch_reports_its_last_metrics_again(data, tmp_path):
    """A finished run restarted (its driver was stopped before the last report arrived) trains nothing and says its
    last epoch's metrics again, so a resumed search trial still reports its val mAP."""
    train, val = data
    job = RetrievalJob(net=NetSpec("tf_efficientnet_lite0", "gem", 3.0, 48, None, frozen_stages=6),
                       optim=Optimisation(1, 4, 0.01, 0.9, 0.0, 10, 0.1, (40, 48), True, 0), train=train,
                       retrieval_val=val, criterion=DOUBLE_MARGIN, sampler=PAIRS)
    first = LocalContext(tmp_path / "ckpt")
    train_retrieval(job, first)
    again = LocalContext(tmp_path / "ckpt")
    train_retrieval(job, again)
    assert again.reports == [first.reports[-1]] and again.steps == []
