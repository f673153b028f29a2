import numpy as np
import pytest
import torch

from components.models.net import RetrievalNet, load_net, save_checkpoint
from components.models.pooling import POOLINGS, RMAC, make_pooling, rmac_regions
from components.models.whitening import (
    Whitening,
    fit_centering,
    fit_learned_whitening,
    fit_pca_whitening,
    matching_pair_covariance,
)


@pytest.mark.parametrize("h, w", [(7, 7), (2, 2), (5, 5)])
def test_rmac_square_maps_have_1_4_9_regions(h, w):
    # square: no extra regions along either side; level l has l × l regions → 1 + 4 + 9 = 14 for L = 3
    assert len(rmac_regions(h, w, 3)) == 14
    assert len(rmac_regions(h, w, 1)) == 1 and rmac_regions(h, w, 1)[0] == (0, 0, h, w)


def test_rmac_regions_of_a_5x5_map():
    # m = 5. l=1: side ⌊10/2⌋=5 at 0. l=2: side ⌊10/3⌋=3, stride (5−3)/1=2 → starts 0, 2.
    # l=3: side ⌊10/4⌋=2, stride (5−2)/2=1.5 → starts ⌊0⌋, ⌊1.5⌋, ⌊3⌋ = 0, 1, 3.
    regions = rmac_regions(5, 5, 3)
    assert regions[0] == (0, 0, 5, 5)
    assert {(y, x) for y, x, s, _ in regions if s == 3} == {(0, 0), (0, 2), (2, 0), (2, 2)}
    assert {(y, x) for y, x, s, _ in regions if s == 2} == {(y, x) for y in (0, 1, 3) for x in (0, 1, 3)}


def test_rmac_regions_of_non_square_maps():
    # h=6, w=10: m = 6; strides for k = 2..7 regions of side 6: b = 4/(k−1) = 4, 2, 1.33, 1, 0.8, 0.67;
    # overlaps (m² − m·b)/m² = 1 − b/6 = 0.33, 0.67, 0.78, 0.83, 0.87, 0.89 → closest to 0.4 is k = 2, so one
    # extra region along the width: level l has (l + 1) × l regions → 2·1 + 3·2 + 4·3 = 20.
    regions = rmac_regions(6, 10, 3)
    assert len(regions) == 20
    assert regions[:2] == [(0, 0, 6, 6), (0, 4, 6, 6)]  # l=1: side 6, stride (10−6)/1 = 4
    # h=4, w=16: m = 4; b = 12/(k−1) = 12, 6, 4, 3, 2.4, 2; overlaps 1 − b/4 = −2, −0.5, 0, 0.25, 0.4, 0.5
    # → k = 6, five extra regions along the width: 6·1 + 7·2 + 8·3 = 44 (and the same for the portrait map).
    assert len(rmac_regions(4, 16, 3)) == 44
    assert len(rmac_regions(16, 4, 3)) == 44
    assert all(x + s <= 16 and y + s <= 4 for y, x, s, _ in rmac_regions(4, 16, 3))


def test_rmac_of_a_constant_map_is_region_count_times_unit_vector():
    x = torch.full((2, 4, 6, 10), 3.0)
    out = RMAC()(x)
    # every region's MAC is (3, 3, 3, 3) → unit vector (½, ½, ½, ½), summed over the 20 regions
    assert torch.allclose(out, torch.full((2, 4), 20 * 0.5))


def test_rmac_is_registered():
    assert "rmac" in POOLINGS and isinstance(make_pooling("rmac"), RMAC)


@pytest.fixture(scope="module")
def rmac_net() -> RetrievalNet:
    torch.manual_seed(0)
    return RetrievalNet.create("tf_efficientnet_lite0", "rmac", image_size=64, weights=None).eval()


def test_rmac_net_gives_unit_descriptors(rmac_net):
    d = rmac_net(torch.randn(2, 3, 64, 96))  # 2×3 feature map
    assert d.shape == (2, 1280) and torch.allclose(d.norm(dim=1), torch.ones(2), atol=1e-5)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)) * np.linspace(3, 0.2, d)  # anisotropic, so whitening has work to do
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("dim", [None, 5])
def test_pca_whitening_makes_train_covariance_identity(dim):
    train = _unit(np.random.default_rng(0), 400, 12)
    mean, proj = fit_pca_whitening(train, dim)
    out_dim = dim or 12
    assert mean.shape == (12,) and proj.shape == (out_dim, 12)
    y = (train - mean) @ proj.T
    np.testing.assert_allclose(np.cov(y, rowvar=False, bias=True), np.eye(out_dim), atol=1e-3)  # ε·λ₁ regularises


def test_pca_whitening_rejects_too_few_descriptors():
    with pytest.raises(ValueError, match="min\\(D, n - 1\\)"):
        fit_pca_whitening(np.random.default_rng(0).normal(size=(5, 8)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        fit_pca_whitening(np.zeros((1, 8)))


def test_whitening_layer_is_unit_norm_and_trainable():
    train = _unit(np.random.default_rng(1), 100, 8)
    mean, proj = fit_pca_whitening(train, 4)
    layer = Whitening.from_pca(mean, proj)
    y = layer(torch.from_numpy(train))
    assert y.shape == (100, 4) and torch.allclose(y.norm(dim=1), torch.ones(100), atol=1e-5)
    expected = (train - mean) @ proj.T
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(y.detach().numpy(), expected, atol=1e-5)
    assert all(p.requires_grad for p in layer.parameters()) and len(list(layer.parameters())) == 2
    y[:, 0].sum().backward()
    assert layer.projection.weight.grad.abs().sum() > 0 and layer.shift.grad.abs().sum() > 0


def test_whitened_net_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    net = RetrievalNet.create("tf_efficientnet_lite0", "gem", image_size=64, weights=None).eval()
    assert net.whitening is None and net.meta["whitening_dim"] is None
    train = _unit(np.random.default_rng(2), 12, 1280)  # stands in for the net's training descriptors
    net.set_whitening(*fit_pca_whitening(train, 8))
    assert net.meta["dim"] == net.meta["whitening_dim"] == 8 and net.pooled_dim == 1280
    x = torch.randn(2, 3, 64, 64)
    d = net(x)
    assert d.shape == (2, 8) and torch.allclose(d.norm(dim=1), torch.ones(2), atol=1e-5)
    save_checkpoint(tmp_path / "w.pt", net)
    again = load_net(tmp_path / "w.pt")
    assert torch.equal(again(x), d) and again.meta["dim"] == 8 and isinstance(again.whitening, Whitening)


def test_set_whitening_checks_the_input_dim(rmac_net):
    with pytest.raises(ValueError, match="1280"):
        rmac_net.set_whitening(np.zeros(8, np.float32), np.eye(4, 8, dtype=np.float32))


def test_pca_whitening_rejects_identical_descriptors():
    with pytest.raises(ValueError, match="all identical"):
        fit_pca_whitening(np.ones((4, 3)), dim=2)


def test_pca_whitening_with_zero_shrinkage_is_plain_whitening():
    train = _unit(np.random.default_rng(3), 200, 10)
    for dim in (None, 4):
        plain, shrunk = fit_pca_whitening(train, dim), fit_pca_whitening(train, dim, shrinkage=0.0)
        assert np.array_equal(plain[0], shrunk[0]) and np.array_equal(plain[1], shrunk[1])


def test_full_shrinkage_scales_every_direction_alike():
    train = _unit(np.random.default_rng(4), 200, 10)
    mean, proj = fit_pca_whitening(train, 6, shrinkage=1.0)
    gram = proj.astype(np.float64) @ proj.T  # rows of U scaled by one factor c: P Pᵀ = c² I
    np.testing.assert_allclose(gram, gram[0, 0] * np.eye(6), atol=1e-6 * gram[0, 0])
    # c = (tr(C)/D)^(−1/2) up to the relative ε
    np.testing.assert_allclose(gram[0, 0], 1 / np.cov(train, rowvar=False, bias=True).trace() * 10, rtol=1e-4)
    half = fit_pca_whitening(train, 6, shrinkage=0.5)[1]
    assert not np.allclose(half @ half.T, (half @ half.T)[0, 0] * np.eye(6))


@pytest.mark.parametrize("shrinkage", [-0.1, 1.5])
def test_shrinkage_out_of_range_raises(shrinkage):
    train = _unit(np.random.default_rng(5), 50, 6)
    labels = np.repeat(np.arange(10), 5)
    with pytest.raises(ValueError, match="shrinkage must be in \\[0, 1\\]"):
        fit_pca_whitening(train, shrinkage=shrinkage)
    with pytest.raises(ValueError, match="shrinkage must be in \\[0, 1\\]"):
        fit_learned_whitening(train, labels, shrinkage=shrinkage)


def test_centering_is_the_train_mean_and_the_identity():
    train = _unit(np.random.default_rng(6), 30, 7)
    mean, proj = fit_centering(train)
    assert mean.dtype == proj.dtype == np.float32 and np.array_equal(proj, np.eye(7, dtype=np.float32))
    np.testing.assert_allclose(mean, train.astype(np.float64).mean(axis=0), atol=1e-7)
    layer = Whitening.from_pca(mean, proj)  # carried by the layer: y = L2(x − μ)
    expected = (train - mean) / np.linalg.norm(train - mean, axis=1, keepdims=True)
    np.testing.assert_allclose(layer(torch.from_numpy(train)).detach().numpy(), expected, atol=1e-6)


def test_matching_pair_covariance_closed_form_equals_the_pair_sum():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(13, 4))
    labels = np.array(list("aaaabbbccdeee"))  # d is a singleton: no pair
    pairs = [(i, j) for i in range(13) for j in range(i + 1, 13) if labels[i] == labels[j]]
    explicit = sum(np.outer(x[i] - x[j], x[i] - x[j]) for i, j in pairs) / len(pairs)
    np.testing.assert_allclose(matching_pair_covariance(x, labels), explicit, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="no class has 2 or more"):
        matching_pair_covariance(x[:5], list("abcde"))
    with pytest.raises(ValueError, match="no class has 2 or more"):
        fit_learned_whitening(x[:5], list("abcde"))


def test_learned_whitening_makes_matching_differences_identity():
    rng = np.random.default_rng(8)
    labels = np.repeat(np.arange(12), 8)
    x = _unit(rng, 12, 6)[labels] + 0.1 * rng.normal(size=(96, 6)) * np.linspace(2, 0.3, 6)
    mean, proj = fit_learned_whitening(x, labels)
    assert mean.shape == (6,) and proj.shape == (6, 6) and proj.dtype == np.float32
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=1e-6)
    y = (x - mean) @ proj.astype(np.float64).T
    diffs = [y[i] - y[j] for i in range(96) for j in range(i + 1, 96) if labels[i] == labels[j]]
    np.testing.assert_allclose(np.mean([np.outer(d, d) for d in diffs], axis=0), np.eye(6), atol=1e-4)
    # the rotation orders the whitened directions by decreasing variance of the descriptors
    variances = np.var(y, axis=0)
    assert np.all(np.diff(variances) <= 1e-9)
    assert fit_learned_whitening(x, labels, 3)[1].shape == (3, 6)


def test_learned_whitening_suppresses_a_within_class_nuisance():
    # Classes sit 0.5 apart along a discriminative e₀ (within-class σ = 0.05); every item also moves by N(0, 5²) along
    # a nuisance e₁ unrelated to its class. Unwhitened, nearest neighbours are ruled by the nuisance; Lw divides e₁
    # by its large matching-difference spread and e₀ by its small one, so e₀ decides.
    rng = np.random.default_rng(9)
    classes, per_class, d = 20, 6, 4
    labels = np.repeat(np.arange(classes), per_class)
    centres = np.zeros((classes, d))
    centres[:, 0] = 0.5 * np.arange(classes)

    def sample() -> np.ndarray:
        x = centres[labels] + 0.05 * rng.normal(size=(len(labels), d))
        x[:, 1] += 5.0 * rng.normal(size=len(labels))
        return x

    train, test = sample(), sample()

    def nn_accuracy(z: np.ndarray) -> float:
        dist = ((z[:, None] - z[None]) ** 2).sum(-1)
        np.fill_diagonal(dist, np.inf)
        return float((labels[dist.argmin(axis=1)] == labels).mean())

    mean, proj = fit_learned_whitening(train, labels)
    plain, whitened = nn_accuracy(test), nn_accuracy((test - mean) @ proj.T)
    assert plain < 0.6 and whitened > 0.95, (plain, whitened)
