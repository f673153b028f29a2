"""Mined positives (ALISC's same-item mining, for labelled data): same-class pairs of a k-means cluster of the current
model's descriptors, above a cosine threshold, added to the random pairs. Never a pair of two labels, never an image
outside the train split, the threshold kept, seeded, and one epoch trains through the retrieval loop."""

import itertools
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

import components.training.batches as batches
from components.models.spec import NetSpec
from components.registry import Spec
from components.training.batches import SAMPLERS, MinedPositivePairs, TrainingData, mine_cluster_positives
from components.training.context import LocalContext
from components.training.jobs import LabelledImages, Optimisation, RetrievalJob, RetrievalValSet
from components.training.retrieval import train_retrieval
from pipelines.params import ParamsError, load_params
from tests.conftest import REPO, contrastive, tiny_sample

RNG = np.random.default_rng(0)
DESC = RNG.normal(size=(40, 4)).astype(np.float32)
DESC /= np.linalg.norm(DESC, axis=1, keepdims=True)
LABELS = RNG.integers(0, 3, size=40)


def _mine(desc=DESC, labels=LABELS, clusters=3, threshold=0.5, cap=10**6, seed=0):
    return mine_cluster_positives(desc, labels, clusters, threshold, cap, seed=seed, rng=np.random.default_rng(seed))


def _all_pairs_above(threshold, desc=DESC, labels=LABELS):
    return {(i, j) for i, j in itertools.combinations(range(len(labels)), 2)
            if labels[i] == labels[j] and desc[i] @ desc[j] >= threshold}


def test_mined_pairs_are_same_class_same_cluster_and_above_the_threshold():
    mined = _mine()
    assert len(mined) > 0 and (mined[:, 2] == 1).all() and (mined[:, 0] < mined[:, 1]).all()
    assert (LABELS[mined[:, 0]] == LABELS[mined[:, 1]]).all()
    assert ((DESC[mined[:, 0]] * DESC[mined[:, 1]]).sum(axis=1) >= 0.5).all()
    assert {(int(i), int(j)) for i, j, _ in mined} <= _all_pairs_above(0.5)


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.5, 0.9])
def test_one_cluster_mines_exactly_the_same_class_pairs_above_the_threshold(threshold):
    assert {(int(i), int(j)) for i, j, _ in _mine(clusters=1, threshold=threshold)} == _all_pairs_above(threshold)


def test_clusters_gate_the_pairs_and_labels_always_separate_them():
    assert len(_mine(clusters=len(LABELS), threshold=-1.0)) == 0  # every image its own cluster: nothing to pair
    twins = np.repeat(DESC[:3], 2, axis=0)  # three pairs of exact duplicates (cosine 1), each of two labels
    labels = np.array([0, 1, 1, 2, 2, 0])
    assert len(_mine(desc=twins, labels=labels, clusters=1, threshold=0.999)) == 0
    mined = _mine(desc=twins, labels=labels, clusters=1, threshold=-1.0)
    assert {(int(i), int(j)) for i, j, _ in mined} == {(0, 5), (1, 2), (3, 4)}  # the same-label pairs only


def test_at_most_max_per_class_pairs_per_class():
    mined = _mine(clusters=1, threshold=-1.0, cap=5)
    assert all((LABELS[mined[:, 0]] == c).sum() == 5 for c in range(3))
    assert {(int(i), int(j)) for i, j, _ in mined} <= _all_pairs_above(-1.0)


def test_mining_is_seeded():
    assert np.array_equal(_mine(clusters=4, cap=7), _mine(clusters=4, cap=7))
    assert any(not np.array_equal(_mine(clusters=4, cap=7, seed=0), _mine(clusters=4, cap=7, seed=s))
               for s in range(1, 6))


def _near_duplicate(source: str, target) -> str:
    """`source` saved again at a lower JPEG quality: the same picture, a different file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as im:
        im.convert("RGB").save(target, format="JPEG", quality=60)
    return str(target)


@pytest.fixture(scope="module")
def job_data(tmp_path_factory):
    """Train: 3 classes × 4 images plus a near-duplicate of two images of each class (so there is something to mine);
    val: 2 classes whose 6 images are near-duplicates (and one an exact copy) of train images."""
    root = tmp_path_factory.mktemp("mined")
    rows = tiny_sample(root / "images", classes=3, per_class=4, max_side=48)
    names = sorted({label for _, label in rows})
    train = [(u, names.index(l)) for u, l in rows]
    train += [(_near_duplicate(u, root / "dup" / f"{k}.jpg"), l) for k, (u, l) in enumerate(train) if k % 4 < 2]
    train.sort(key=lambda r: r[1])
    val = [(_near_duplicate(u, root / "val" / f"{k}.jpg"), k // 3) for k, (u, _) in enumerate(train[::3][:6])]
    shutil.copy(train[0][0], root / "val" / "copy.jpg")
    val[0] = (str(root / "val" / "copy.jpg"), 0)
    return (LabelledImages([u for u, _ in train], [l for _, l in train]),
            RetrievalValSet([u for u, _ in val], [l for _, l in val], [k % 3 == 0 for k in range(len(val))]))


NET = NetSpec("tf_efficientnet_lite0", "gem", 3.0, 48, None, frozen_stages=6)
OPTIM = Optimisation(1, 4, 0.01, 0.9, 0.0, 10, 0.1, (40, 48), True, 0)
MINED = Spec("mined_positive_pairs", {"pos_per_class": 2, "neg_per_class": 2, "redraw_every": 1, "clusters": 3,
                                      "threshold": 0.9, "max_mined_per_class": 50})


def test_mined_positives_train_one_epoch_and_never_touch_val_images(job_data, tmp_path, monkeypatch, caplog):
    train, val = job_data
    embedded, mined_by_call = [], []

    def recording_embed_all(net, uris, indices, batch_size, ctx):
        embedded.extend(uris[int(i)] for i in indices)
        return real_embed_all(net, uris, indices, batch_size, ctx)

    def recording_mine(desc, labels, *args, **kwargs):
        mined = real_mine(desc, labels, *args, **kwargs)
        mined_by_call.append((desc, np.asarray(labels), mined))
        return mined

    real_embed_all, real_mine = batches.embed_all, batches.mine_cluster_positives
    monkeypatch.setattr(batches, "embed_all", recording_embed_all)  # the sampler's embedding, not val_map's
    monkeypatch.setattr(batches, "mine_cluster_positives", recording_mine)
    job = RetrievalJob(net=NET, optim=OPTIM, train=train, retrieval_val=val, criterion=contrastive(0.5, 1.2),
                       sampler=MINED)
    ctx = LocalContext(tmp_path / "ckpt")
    with caplog.at_level(logging.INFO, logger="components.training.batches"):
        train_retrieval(job, ctx)

    assert [r["epoch"] for r in ctx.reports] == [0, 1] and np.isfinite(ctx.reports[1]["train_loss"])
    assert sorted(embedded) == sorted(train.uris) and not set(embedded) & set(val.uris)
    [(desc, labels, mined)] = mined_by_call
    assert len(mined) > 0, "the train near-duplicates should be mined"
    pair_uris = {train.uris[int(k)] for k in mined[:, :2].ravel()}
    assert pair_uris <= set(train.uris) and not pair_uris & set(val.uris)
    assert (labels[mined[:, 0]] == labels[mined[:, 1]]).all()
    assert ((desc[mined[:, 0]] * desc[mined[:, 1]]).sum(axis=1) >= 0.9).all()
    assert f"epoch 1: {len(mined)} mined positive pairs" in caplog.text


def test_the_sampler_adds_the_mined_pairs_to_the_random_ones_and_is_deterministic(job_data, tmp_path):
    train, _ = job_data
    net = NET.build()
    data = TrainingData(train, net, OPTIM, LocalContext(tmp_path), eval_batch_size=8)
    first, second = SAMPLERS.build(MINED), SAMPLERS.build(MINED)
    assert isinstance(first, MinedPositivePairs)
    epoch_batches = first.batches(1, data)
    second.batches(1, data)
    mined = first.mined[0]
    assert epoch_batches.stats == {"mined_positive_pairs": len(mined)} and len(mined) > 0
    assert np.array_equal(first._drawn[0], second._drawn[0]) and np.array_equal(mined, second.mined[0])
    random = len(first._drawn[0]) - len(mined)
    assert random == 3 * (2 + 2) and np.array_equal(first._drawn[0][random:], mined)
    assert len(epoch_batches) == -(-len(first._drawn[0]) // OPTIM.batch_size)


def _override(tmp_path, args: str):
    (tmp_path / "over.yaml").write_text(f"tune: {{search: off}}\nretrieval:\n  sampler: {{name: mined_positive_pairs, args: {{{args}}}}}\n")
    return load_params(REPO / "params.yaml", tmp_path / "over.yaml")


GOOD = "pos_per_class: 6, neg_per_class: 6, redraw_every: 5, clusters: 32, threshold: 0.8, max_mined_per_class: 50"


def test_params_select_it_from_yaml(tmp_path):
    assert _override(tmp_path, GOOD).retrieval.sampler.spec() == Spec("mined_positive_pairs", {
        "pos_per_class": 6, "neg_per_class": 6, "redraw_every": 5, "clusters": 32, "threshold": 0.8,
        "max_mined_per_class": 50})


@pytest.mark.parametrize("change, message", [
    (("threshold: 0.8", "threshold: 1.5"), "sampler.mined_positive_pairs.args.threshold: Input should be less than or equal to 1"),
    (("clusters: 32", "clusters: 0"), "sampler.mined_positive_pairs.args.clusters: Input should be greater than or equal to 1"),
    (("clusters: 32", "clusters: 2.5"), "sampler.mined_positive_pairs.args.clusters: Input should be a valid integer"),
    (("max_mined_per_class: 50", "max_mined_per_clas: 50"), "sampler.mined_positive_pairs.args.max_mined_per_clas: unknown key"),
    ((", clusters: 32", ""), "sampler.mined_positive_pairs.args.clusters: required key is missing"),
])
def test_bad_args_are_refused_naming_the_key(tmp_path, change, message):
    with pytest.raises(ParamsError) as caught:
        _override(tmp_path, GOOD.replace(*change))
    assert "retrieval." + message in str(caught.value)
