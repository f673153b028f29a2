"""Each retrieval method trains for one epoch through the same loop (single process, tiny real images)."""

import json

import numpy as np
import pytest

from components.training.context import LocalContext, read_train_state
from components.training.loops import LabelledImages, NetSpec, Optimisation, RetrievalJob, RetrievalValSet, train_retrieval
from tests.conftest import tiny_sample


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = tiny_sample(tmp_path_factory.mktemp("images"), classes=5, per_class=6, max_side=48)
    names = sorted({label for _, label in rows})
    labelled = [(u, names.index(l)) for u, l in rows]
    train = [(u, l) for u, l in labelled if l < 3]
    val = [(u, l - 3) for u, l in labelled if l >= 3]
    return (LabelledImages([u for u, _ in train], [l for _, l in train]),
            RetrievalValSet([u for u, _ in val], [l for _, l in val], [i % 6 < 2 for i in range(len(val))]))


@pytest.mark.parametrize("variant", [
    {"loss": "contrastive", "pos_margin": 0.0},                       # retr-s: single margin
    {"loss": "contrastive", "squared_hinge": False},                  # retr-d, plain hinge
    {"loss": "contrastive", "mining": "hard_negative", "mining_pool_size": 10},
    {"loss": "triplet", "classes_per_batch": 2, "images_per_class": 3},
    {"loss": "siamese"},
])
def test_retrieval_variant_trains_one_epoch(data, tmp_path, variant):
    train, val = data
    job = RetrievalJob(
        net=NetSpec("tf_efficientnet_lite0", "gem", 3.0, 48, None, frozen_stages=6),
        optim=Optimisation(1, 4, 0.01, 0.9, 0.0, 10, 0.1, (40, 48), True, 0, rotation_degrees=5, color_jitter=0.2),
        train=train, retrieval_val=val, pos_margin=variant.pop("pos_margin", 0.5), neg_margin=1.2,
        pos_pairs_per_class=2, neg_pairs_per_class=2, redraw_every=1, **variant,
    )
    ctx = LocalContext(tmp_path / "ckpt")
    train_retrieval(job, ctx)
    assert [r["epoch"] for r in ctx.reports] == [0, 1]
    assert np.isfinite(ctx.reports[1]["train_loss"]) and 0 < ctx.reports[1]["val_map"] <= 1
    state = read_train_state(ctx.latest_checkpoint())
    if job.loss == "siamese":  # the loss's own heads are trained and checkpointed with the net
        assert any(k.startswith("loss.verification") for k in state["model"])
    history = json.loads((ctx.latest_checkpoint() / "history.json").read_text())
    assert len(history) == 2


def test_unknown_loss_is_rejected(data):
    train, val = data
    with pytest.raises(ValueError, match="unknown loss"):
        RetrievalJob(net=NetSpec("x", "gem", 3.0, 48, None, 0), optim=None, train=train, retrieval_val=val,
                     pos_margin=0.1, neg_margin=1.0, pos_pairs_per_class=1, neg_pairs_per_class=1, redraw_every=1, loss="arcface")
