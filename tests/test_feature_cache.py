"""The frozen trunk computed once: the descriptors it continues to are the full pass's, a cached job trains what an
uncached one does, and P×K epochs of a given length."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from components.data.samplers import PKBatchSampler
from components.data.transforms import BatchTransform
from components.models.net import RetrievalNet
from components.models.spec import NetSpec
from components.registry import Spec
from components.training.context import LocalContext
from components.training.jobs import Optimisation, RetrievalJob
from components.training.retrieval import train_retrieval
from pipelines.params import ParamsError, load_params
from tests.conftest import params_with, random_pairs, tiny_retrieval_data

MS = Spec("multi_similarity", {"alpha": 2.0, "beta": 50.0, "base": 0.5})
PK = Spec("class_balanced", {"classes_per_batch": 2, "images_per_class": 3, "batches_per_epoch": 4})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_retrieval_data(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("frozen_stages, blocks, pooling", [
    (1, 0, "gem"), (4, 3, "gem"), (7, 6, "gem"),
    (4, 3, {"stages": [2, 4], "channels": 16, "pooling": "gem"}),  # block 2's map is the trunk itself
    (2, 1, {"stages": [3, 5], "channels": 16, "pooling": "spoc"}),
], ids=["gem-stem", "gem-3", "gem-6", "multi_level-trunk-fused", "multi_level-after-trunk"])
def test_descriptors_from_the_trunk_equal_the_full_pass(data, frozen_stages, blocks, pooling):
    torch.manual_seed(0)
    net = (RetrievalNet.create("tf_efficientnet_lite0", "gem", 64, None) if pooling == "gem" else
           RetrievalNet.create("tf_efficientnet_lite0", "multi_level", 64, None, pooling_args=pooling)).eval()
    net.freeze(frozen_stages)
    train, _ = data
    images = BatchTransform.for_eval(net.meta)([(Image.open(u).convert("RGB"),) for u in train.uris[:4]])[0]
    assert net.frozen_trunk() == blocks
    with torch.no_grad():
        full, cached = net.describe([images]), net.describe_from_trunk(net.trunk(images, blocks), blocks)
    assert torch.allclose(full, cached, atol=1e-6)


def test_no_trunk_to_cache_is_one_clear_error():
    net = RetrievalNet.create("tf_efficientnet_lite0", "gem", 64, None)
    net.freeze(0)
    with pytest.raises(ValueError, match="stem trains"):
        net.frozen_trunk()
    ml = RetrievalNet.create("tf_efficientnet_lite0", "multi_level", 64, None,
                             pooling_args={"stages": [1, 4], "channels": 32, "pooling": "gem"})
    ml.freeze(4)
    with pytest.raises(ValueError, match="inside the frozen trunk of 3 blocks"):
        ml.frozen_trunk()


def _job(train, val, cached: bool, sampler: Spec, hflip: bool = False) -> RetrievalJob:
    return RetrievalJob(net=NetSpec("tf_efficientnet_lite0", "gem", 3.0, 48, None, frozen_stages=5),
                        optim=Optimisation(2, 4, 0.01, 0.9, 0.0, 10, 0.1, (48, 48), hflip, 0), train=train,
                        retrieval_val=val, criterion=MS, sampler=sampler,
                        miner=Spec("multi_similarity", {"epsilon": 0.1}), cache_frozen_trunk=cached)


@pytest.mark.parametrize("sampler", [PK, random_pairs(2, 2)], ids=["class_balanced", "random_pairs"])
def test_a_cached_job_trains_what_the_uncached_one_does(data, tmp_path, sampler):
    """Without flips both see the same images at the same size in the same batches: same val figure before
    training (the val trunks are float32), same losses and val figures after, up to the float16 train cache."""
    train, val = data
    runs = {}
    for cached in (False, True):
        ctx = LocalContext(tmp_path / str(cached))
        torch.manual_seed(0)
        train_retrieval(_job(train, val, cached, sampler), ctx)
        runs[cached] = ctx.reports
    plain, cached = runs[False], runs[True]
    assert [r["epoch"] for r in cached] == [0, 1, 2]
    assert cached[0]["val_map"] == pytest.approx(plain[0]["val_map"], abs=1e-6)
    for a, b in zip(plain[1:], cached[1:]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-2, abs=1e-3)
        assert b["val_map"] == pytest.approx(a["val_map"], abs=2e-2)
    assert cached[1]["train_loss"] != cached[2]["train_loss"], "the cached job trains"


def test_a_cached_job_with_flips_draws_both_views(data, tmp_path):
    train, val = data
    ctx = LocalContext(tmp_path / "flip")
    train_retrieval(_job(train, val, True, PK, hflip=True), ctx)
    assert np.isfinite(ctx.reports[-1]["train_loss"]) and 0 < ctx.reports[-1]["val_map"] <= 1


def test_a_cached_job_refuses_augmentations_it_cannot_cache(data, tmp_path):
    train, val = data
    job = _job(train, val, True, PK)
    job = RetrievalJob(**{**job.__dict__, "optim": Optimisation(1, 4, 0.01, 0.9, 0.0, 10, 0.1, (40, 48), False, 0)})
    with pytest.raises(ValueError, match=r"train_max_side \[S, S\]"):
        train_retrieval(job, LocalContext(tmp_path / "refused"))


@pytest.mark.parametrize("batches, replicas", [(None, 1), (12, 1), (12, 2), (7, 2)])
def test_pk_epochs_have_the_batches_asked_and_whole_passes_over_the_classes(batches, replicas):
    labels = np.repeat(np.arange(10), 5)
    per_rank = [list(PKBatchSampler(labels, 4, 2, seed=3, num_replicas=replicas, rank=r, batches=batches))
                for r in range(replicas)]
    total = sum(len(b) for b in per_rank)
    expected = 3 if batches is None else -(-batches // replicas) * replicas
    assert total == expected and all(len(b) == expected // replicas for b in per_rank)
    seen = np.bincount([labels[i] for rank in per_rank for batch in rank for i in batch[::2]], minlength=10)
    if batches == 12:  # 4 whole passes over the 10 classes (3 batches of 4 each): every class in every pass
        assert seen.min() >= 4
    assert all(len(set(labels[batch])) == 4 for rank in per_rank for batch in rank)


def test_pk_sampler_without_batches_draws_as_before():
    """The default epoch (each class about once) is the same draw as before `batches` existed."""
    labels = np.repeat(np.arange(10), 5)
    rng = np.random.default_rng([3, 0])
    perm = rng.permutation(np.arange(10))
    first = list(PKBatchSampler(labels, 4, 2, seed=3))[0]
    assert sorted(set(labels[first])) == sorted(perm[:4].tolist())


@pytest.mark.parametrize("changes, message", [
    ({"retrieval": {"train_max_side": [160, 224]}}, "retrieval: cache_frozen_trunk trains at one size with flips only"),
    ({"retrieval": {"train_max_side": [224, 224], "rotation_degrees": 5}}, "rotation_degrees, color_jitter 0"),
    ({"model": {"frozen_stages": 0}}, "needs a frozen trunk: model.frozen_stages >= 1"),
    ({"model": {"frozen_stages": 4, "pooling": {"name": "multi_level", "args": {"stages": [1, 4], "channels": 32,
                                                                             "pooling": "gem"}}}},
     "fuses block 1, inside the frozen trunk (blocks 0-2): fuse blocks >= 2"),
])
def test_params_refuse_what_the_trunk_cache_cannot_do_in_one_line(tmp_path, changes, message):
    path = tmp_path / "params.yaml"
    path.write_text(params_with(changes))
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_params(path)
    path.write_text(params_with({**changes, "retrieval": {**changes.get("retrieval", {}), "cache_frozen_trunk": False}}))
    assert not load_params(path).retrieval.cache_frozen_trunk
