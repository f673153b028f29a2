import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from components.data.samplers import PKBatchSampler, draw_query_positives, draw_random_pairs, draw_ratio_pairs, mine_hard_negative_pairs

LABELS = np.array([0] * 5 + [1] * 3 + [2] * 1)


# --- ratio pairs and query positives ----------------------------------------------------------------------------------

@pytest.mark.parametrize("pos, ratio, neg", [(4, 1.0, 4), (4, 1.5, 6), (3, 1.5, 5), (10, 1.01, 10), (10, 4.0, 40)])
def test_ratio_pairs_are_random_pairs_with_rounded_negatives(pos, ratio, neg):
    pairs = draw_ratio_pairs(LABELS, pos, ratio, np.random.default_rng(3))
    assert np.array_equal(pairs, draw_random_pairs(LABELS, pos, neg, np.random.default_rng(3)))
    assert (pairs[:, 2] == 0).sum() == neg * 3  # 3 classes, round half up: 3 · 1.5 = 4.5 → 5


def test_query_positives_same_class_other_image():
    queries = np.array([0, 3, 5, 8])  # 8 is alone in class 2: no positive
    pairs = draw_query_positives(queries, LABELS, np.random.default_rng(0))
    i, j, y = pairs.T
    assert sorted(i.tolist()) == [0, 3, 5] and np.all(y == 1)
    assert np.all(LABELS[i] == LABELS[j]) and np.all(i != j)
    assert draw_query_positives(np.array([8]), LABELS, np.random.default_rng(0)).shape == (0, 3)


# --- hard negative mining ---------------------------------------------------------------------------------------------

def _points(xs) -> np.ndarray:
    return np.array([[x, 0.0] for x in xs], dtype=np.float32)


# pool at positions 10..14 of the training list: x = 0.1 (class 0), 0.5 (1), 0.6 (1), 0.9 (2), 2.0 (3)
POOL, POOL_LABELS, POOL_INDEX = _points([0.1, 0.5, 0.6, 0.9, 2.0]), np.array([0, 1, 1, 2, 3]), np.arange(10, 15)


def test_hard_negative_is_the_closest_other_class_image():
    # query 7 (class 0) at 0: pool 10 is closer but same class → 11 (class 1, d = 0.5)
    # query 8 (class 1) at 0.58: 12 (0.02) and 11 (0.08) are its own class → 13 (class 2, d = 0.32)
    pairs = mine_hard_negative_pairs(_points([0.0, 0.58]), np.array([0, 1]), POOL, POOL_LABELS, np.array([7, 8]), POOL_INDEX)
    assert pairs.tolist() == [[7, 11, 0], [8, 13, 0]]


def test_hard_negatives_one_per_class():
    # query at 0, class 0, by distance: 10 (own class), 11 (class 1), 12 (class 1 again: skipped), 13 (class 2), 14 (class 3)
    pairs = mine_hard_negative_pairs(_points([0.0]), np.array([0]), POOL, POOL_LABELS, np.array([7]), POOL_INDEX, negatives_per_query=3)
    assert pairs.tolist() == [[7, 11, 0], [7, 13, 0], [7, 14, 0]]
    # asking for more than there are other classes gives one per class
    assert len(mine_hard_negative_pairs(_points([0.0]), np.array([0]), POOL, POOL_LABELS, np.array([7]), POOL_INDEX, negatives_per_query=9)) == 3
    # a query whose class fills the pool gets none
    assert mine_hard_negative_pairs(_points([0.0]), np.array([0]), POOL[:1], POOL_LABELS[:1], np.array([7]), POOL_INDEX[:1]).shape == (0, 3)


def test_hard_negatives_match_brute_force():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=40)
    desc = rng.normal(size=(40, 3)).astype(np.float32)
    queries, pool = rng.choice(40, 8, replace=False), rng.choice(40, 25, replace=False)
    pairs = mine_hard_negative_pairs(desc[queries], labels[queries], desc[pool], labels[pool], queries, pool, negatives_per_query=2, chunk=3)
    for q in queries:
        chosen = pairs[pairs[:, 0] == q, 1]
        dist = np.linalg.norm(desc[pool] - desc[q], axis=1)
        by_class = {}  # closest pool image of every other class
        for k in np.argsort(dist):
            by_class.setdefault(labels[pool[k]], pool[k])
        by_class.pop(labels[q], None)
        expected = sorted(by_class.values(), key=lambda j: dist[pool.tolist().index(j)])[:2]
        assert chosen.tolist() == expected
        assert np.all(labels[chosen] != labels[q]) and len(set(labels[chosen])) == len(chosen)
    assert np.all(pairs[:, 2] == 0)


# --- P×K batches ------------------------------------------------------------------------------------------------------

PK_LABELS = np.array([0] * 4 + [1] * 4 + [2] * 2 + [3] * 3 + [4] * 1)


def test_pk_batches_have_p_classes_of_k_images():
    sampler = PKBatchSampler(PK_LABELS, classes_per_batch=2, images_per_class=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3  # ⌈5 / 2⌉
    for batch in batches:
        classes, counts = np.unique(PK_LABELS[batch], return_counts=True)
        assert len(batch) == 6 and len(classes) == 2 and np.all(counts == 3)
        for c in classes:  # without replacement where the class has K images
            own = [i for i in batch if PK_LABELS[i] == c]
            assert len(set(own)) == min(3, (PK_LABELS == c).sum())
    assert set(PK_LABELS[np.concatenate(batches)]) == {0, 1, 2, 3, 4}  # every class in the epoch


def _pk_epoch(seed: int, epoch: int) -> list[list[int]]:
    sampler = PKBatchSampler(PK_LABELS, 2, 2, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_pk_sampler_is_seeded_per_epoch():
    assert _pk_epoch(1, 0) == _pk_epoch(1, 0)
    assert _pk_epoch(1, 0) != _pk_epoch(1, 1) and _pk_epoch(1, 0) != _pk_epoch(2, 0)


def test_pk_shards_are_disjoint_and_equal_in_length():
    labels = np.repeat(np.arange(4), 3)
    shards = [list(PKBatchSampler(labels, 1, 2, seed=5, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 2
    classes = [{int(labels[b[0]]) for b in shard} for shard in shards]
    assert classes[0].isdisjoint(classes[1]) and classes[0] | classes[1] == {0, 1, 2, 3}
    # 3 groups of 2 classes over 2 ranks: padded to 4 batches so every rank steps the same number of times
    uneven = [PKBatchSampler(PK_LABELS, 2, 2, num_replicas=2, rank=r) for r in (0, 1)]
    assert [len(s) for s in uneven] == [len(list(s)) for s in uneven] == [2, 2]
    assert not {tuple(b) for b in uneven[0]} & {tuple(b) for b in uneven[1]}


def test_pk_sampler_feeds_a_dataloader():
    loader = DataLoader(TensorDataset(torch.as_tensor(PK_LABELS)), batch_sampler=PKBatchSampler(PK_LABELS, 3, 2, seed=0))
    assert [len(y) for (y,) in loader] == [6, 6]


def test_pk_sampler_validates():
    with pytest.raises(ValueError, match="classes_per_batch"):
        PKBatchSampler(PK_LABELS, 6, 2)
    with pytest.raises(ValueError, match="rank"):
        PKBatchSampler(PK_LABELS, 2, 2, num_replicas=2, rank=2)
