import numpy as np
import pytest
import torch
from PIL import Image

from components.data.datasets import ImageDataset
from components.data.transforms import BatchTransform
from components.models.net import RetrievalNet
from components.search.embed import embed_images
from tests.conftest import random_net


@pytest.fixture(scope="module")
def net() -> RetrievalNet:
    return random_net()


@pytest.fixture(scope="module")
def uris(tmp_path_factory) -> list[str]:
    """Five random images of different sizes and aspect ratios, as PNG files."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h) in enumerate([(80, 60), (50, 90), (64, 64), (120, 40), (33, 47)]):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _unit_sum(*descriptors: np.ndarray) -> np.ndarray:
    total = np.sum(descriptors, axis=0, dtype=np.float64)
    return total / np.linalg.norm(total, axis=1, keepdims=True)


def test_single_scale_is_a_direct_forward(net, uris):
    batch = BatchTransform.for_eval(net.meta)([(img, 0, i) for img, _, i in ImageDataset(uris, [0] * len(uris))])
    with torch.no_grad():
        expected = net(batch[0]).numpy()
    idx, desc = embed_images(net, uris, batch_size=8)
    assert np.array_equal(idx, np.arange(5)) and desc.dtype == np.float32
    assert np.array_equal(desc, expected)
    assert np.array_equal(embed_images(net, uris, batch_size=8, scales=[1.0])[1], expected)


def test_multi_scale_is_the_normalised_sum_of_single_scales(net, uris):
    singles = [embed_images(net, uris, batch_size=2, scales=[s])[1] for s in (1.0, 0.75, 1.4)]
    idx, multi = embed_images(net, uris, batch_size=2, scales=(1.0, 0.75, 1.4))
    assert np.array_equal(idx, np.arange(5)) and multi.shape == (5, 1280)
    np.testing.assert_allclose(multi, _unit_sum(*singles), atol=1e-6)
    assert not np.allclose(singles[0], singles[1], atol=1e-3)  # the scales do see different images
    # scales are relative to image_size when it is given: 0.5 × 128 = 1.0 × 64
    assert np.array_equal(embed_images(net, uris, batch_size=2, image_size=128, scales=[0.5])[1], singles[0])


def test_meta_scales_are_the_default(net, uris, monkeypatch):
    explicit = embed_images(net, uris, batch_size=4, scales=[1.0, 0.75])[1]
    monkeypatch.setitem(net.meta, "scales", [1.0, 0.75])
    assert np.array_equal(embed_images(net, uris, batch_size=4)[1], explicit)
    single = embed_images(net, uris, batch_size=4, scales=[1.0])[1]  # an explicit argument wins over the meta
    assert not np.allclose(single, explicit, atol=1e-3)


@pytest.mark.parametrize("scales", [[], [0.0], [1.0, -0.5], [float("nan")], [0.001]])
def test_bad_scales_raise(net, uris, scales):
    with pytest.raises(ValueError, match="scales"):
        embed_images(net, uris, scales=scales)


def test_whitening_applies_to_the_multi_scale_descriptor(net, uris):
    """A search model's whitening was fit on multi-scale descriptors: it must see their sum, not each scale."""
    import copy

    plain = embed_images(net, uris, batch_size=2, scales=(1.0, 0.75))[1]
    rng = np.random.default_rng(0)
    mean, projection = rng.normal(size=1280).astype(np.float32) * 0.01, rng.normal(size=(16, 1280)).astype(np.float32)
    whitened_net = copy.deepcopy(net)
    whitened_net.set_whitening(mean, projection)
    y = (plain - mean) @ projection.T
    expected = y / np.linalg.norm(y, axis=1, keepdims=True)
    np.testing.assert_allclose(embed_images(whitened_net, uris, batch_size=2, scales=(1.0, 0.75))[1], expected, atol=1e-5)


def test_embedding_mid_training_leaves_every_module_in_its_mode(net, uris):
    """A sampler that embeds with the current model mid-epoch (mined positives, hard negatives) must not unfreeze
    the BatchNorm statistics the training loop froze: each module's train/eval mode is restored as it was."""
    from components.models.net import freeze_batchnorm_statistics

    net.train()
    freeze_batchnorm_statistics(net)
    before = {name: m.training for name, m in net.named_modules()}
    assert any(before.values()) and not all(before.values())
    embed_images(net, uris, batch_size=2)
    assert {name: m.training for name, m in net.named_modules()} == before
    net.eval()


def test_a_draft_decode_model_describes_large_jpegs_nearly_as_a_full_decode(net, tmp_path):
    """meta draft_decode: large JPEGs are decoded at reduced scale (not bit-identical to a full decode, but the same
    picture); the digest that ties indexes to models tells the two apart; without the key nothing changes."""
    from components.catalog.describe import model_digest
    from components.data.images import DRAFT_DECODE

    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        smooth = np.kron(rng.integers(0, 256, (30, 40, 3)), np.ones((20, 20, 1))).astype(np.uint8)  # 800x600
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(smooth).save(paths[-1], quality=90)
    drafted = random_net()
    drafted.meta = {**drafted.meta, DRAFT_DECODE: True}
    _, full = embed_images(net, paths, batch_size=2)
    _, draft = embed_images(drafted, paths, batch_size=2)
    similarity = np.sum(full * draft, axis=1)
    assert np.all(similarity > 0.99) and not np.allclose(full, draft, atol=1e-5)
    assert model_digest(drafted) != model_digest(net)
    unset = random_net()
    unset.meta = {**unset.meta, DRAFT_DECODE: False}
    assert model_digest(unset) == model_digest(net)
