"""NetVLAD, GeM fused with second-order pooling and multi-scale orderless pooling (MOP): each alone on toy maps, each
trained one epoch through the one retrieval loop, each selected from params; old GeM checkpoints load unchanged."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter

from components.models.net import RetrievalNet, load_net, read_checkpoint, save_checkpoint
from components.models.pooling import MOP, GeMSecondOrder, NetVLAD, make_pooling, sqrtm_newton_schulz
from components.models.spec import NetSpec
from components.registry import Spec
from components.training.context import LocalContext, read_train_state
from components.training.jobs import Optimisation, RetrievalJob
from components.training.fit import initialise_pooling
from components.training.retrieval import train_retrieval
from pipelines.common import net_spec
from pipelines.params import ParamsError, Pooling, load_params
from tests.conftest import contrastive, params_with, random_pairs, tiny_retrieval_data

NETVLAD = {"clusters": 16, "reduction_dim": 128, "alpha": 100.0}
SECOND_ORDER = {"reduction_dim": 64, "iterations": 5, "centred": True}
MOP_ARGS = {"levels": [1, 2, 3], "region_pooling": "gem"}


# ---------------------------------------------------------------- NetVLAD


def test_netvlad_output_shape_and_dim():
    pool = NetVLAD(in_channels=32, clusters=4, reduction_dim=8, alpha=10.0)
    out = pool(torch.rand(2, 32, 5, 7))
    assert out.shape == (2, 32) and pool.output_dim(32) == 4 * 8
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-6)
    assert NetVLAD(in_channels=6, clusters=3, reduction_dim=None).output_dim(6) == 18  # no reduction: K·C
    assert not pool.is_initialised and "initialised" in dict(pool.named_buffers())


def test_lite0_netvlad_is_2048_dim_and_the_head_and_whitening_follow():
    net = RetrievalNet.create("tf_efficientnet_lite0", "netvlad", 64, None, pooling_args=NETVLAD).eval()
    assert net.pooled_dim == net.meta["dim"] == 16 * 128 and net.meta["pooling_args"] == NETVLAD
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    net.set_whitening(np.zeros(2048, np.float32), np.eye(8, 2048, dtype=np.float32))
    assert net.meta["dim"] == 8


def test_netvlad_intra_normalises_each_centre_block():
    torch.manual_seed(0)
    soft = NetVLAD(in_channels=5, clusters=4, reduction_dim=None, alpha=1.0)  # soft: every centre gets mass
    blocks = soft(torch.rand(3, 5, 4, 4)).reshape(3, 4, 5).norm(dim=-1)
    # each block is unit before the final L2 over K unit blocks → each 1/√K after it
    assert torch.allclose(blocks, torch.full((3, 4), 0.5), atol=1e-5)
    hard = NetVLAD(in_channels=2, clusters=3, reduction_dim=None, alpha=1e4)
    hard.set_centres(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))  # nothing lies near (−1, 0)
    x = torch.tensor([[0.9, 0.2, 0.8, 0.1], [0.1, 0.9, 0.3, 0.95]]).reshape(1, 2, 2, 2)
    blocks = hard(x).reshape(3, 2).norm(dim=-1)
    assert blocks[2] == 0 and torch.allclose(blocks[:2], torch.full((2,), 2 ** -0.5), atol=1e-5)


def _classic_vlad(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """VLAD by hand: L2-normalised locals, nearest-centre residual sums, intra-normalised, flattened, L2."""
    local = x.reshape(x.shape[0], -1).T
    local = local / np.linalg.norm(local, axis=1, keepdims=True)
    nearest = ((local[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    v = np.stack([(local[nearest == k] - centres[k]).sum(0) for k in range(len(centres))])
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = np.where(norms > 0, v / np.maximum(norms, 1e-12), 0)
    return v.ravel() / np.linalg.norm(v)


def test_hard_netvlad_equals_classic_vlad():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 3))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.abs(rng.normal(size=(3, 4, 5)))  # one map, 20 locals
    pool = NetVLAD(in_channels=3, clusters=3, reduction_dim=None, alpha=1e5)
    pool.set_centres(torch.from_numpy(centres).float())
    out = pool(torch.from_numpy(x).float()[None])[0].detach().numpy()
    np.testing.assert_allclose(out, _classic_vlad(x, centres.astype(np.float32)), atol=1e-5)


def _toy_clusters(rng: np.random.Generator, directions: np.ndarray, per: int, noise: float) -> np.ndarray:
    points = np.repeat(directions, per, axis=0) + noise * rng.normal(size=(len(directions) * per, directions.shape[1]))
    return points.astype(np.float32)


def test_kmeans_init_puts_centres_on_the_toy_clusters():
    rng = np.random.default_rng(1)
    directions = np.eye(3)
    points = _toy_clusters(rng, directions, 60, 0.05)
    maps = torch.from_numpy(points.T.reshape(1, 3, 12, 15))  # the (B, C, H, W) form the job passes... as a map
    pool = NetVLAD(in_channels=3, clusters=3, reduction_dim=None, alpha=100.0)
    pool.init_from_features(maps, seed=0)
    assert pool.is_initialised
    centres = pool.centres.detach().numpy()
    distance = np.linalg.norm(directions[:, None] - centres[None], axis=-1)  # (true cluster, centre)
    assert sorted(distance.argmin(1).tolist()) == [0, 1, 2] and distance.min(1).max() < 0.1
    # the assignment conv follows the centres: each toy point goes to its own cluster's centre
    assign = pool.assign(F.normalize(torch.from_numpy(points).T[None, :, :, None], dim=1)).argmax(1).flatten()
    assert all(len(set(assign[k * 60:(k + 1) * 60].tolist())) == 1 for k in range(3))


def test_kmeans_init_with_a_reduction_projects_onto_the_principal_subspace():
    rng = np.random.default_rng(2)
    directions = np.zeros((4, 6))
    directions[:, :3] = [[3, 0, 0], [0, 3, 0], [0, 0, 3], [-2, -2, -2]]  # the data lies (up to noise) in span(e0, e1, e2)
    points = _toy_clusters(rng, directions, 50, 0.01)
    pool = NetVLAD(in_channels=6, clusters=4, reduction_dim=3, alpha=100.0)
    pool.init_from_features(torch.from_numpy(points), seed=0)  # (N, C) rows also do
    w = pool.reduction.weight.detach()[:, :, 0, 0].double()
    assert torch.allclose(w @ w.T, torch.eye(3, dtype=torch.float64), atol=1e-5) and w[:, 3:].abs().max() < 0.02
    assign = pool.assign(pool.local_features(torch.from_numpy(points).T[None, :, :, None])).argmax(1).flatten()
    assert all(len(set(assign[k * 50:(k + 1) * 50].tolist())) == 1 for k in range(4))
    assert len(set(assign.tolist())) == 4
    with pytest.raises(ValueError, match="at least"):
        NetVLAD(in_channels=6, clusters=3, reduction_dim=3).init_from_features(torch.rand(2, 6))


# ---------------------------------------------------------------- GeM + second order


def _rank_one_map(v: torch.Tensor, h: int = 3, w: int = 4) -> torch.Tensor:
    return v[None, :, None, None].expand(1, len(v), h, w).contiguous()


def test_second_order_of_a_rank_one_map():
    torch.manual_seed(0)
    v = torch.rand(8) + 0.1
    x = _rank_one_map(v)
    centred = GeMSecondOrder(in_channels=8, reduction_dim=4, iterations=5, centred=True, p=3.0)
    out = centred(x)[0]
    assert out.shape == (8 + 10,) and centred.output_dim(8) == 18
    # centred: every location equals the mean → zero covariance → zero second-order part; the first is L2(GeM) = L2(v)
    assert torch.all(out[8:] == 0) and torch.allclose(out[:8], F.normalize(v, dim=0), atol=1e-6)
    bilinear = GeMSecondOrder(in_channels=8, reduction_dim=4, iterations=5, centred=False, p=3.0)
    u = bilinear.reduction(x)[0, :, 0, 0].detach()  # the reduced vector at every location
    rows, cols = torch.triu_indices(4, 4)
    outer = torch.outer(u, u)
    # uncentred: Σ = uuᵀ, √Σ = uuᵀ/‖u‖ (Newton–Schulz is exact on a rank-1 projection)
    np.testing.assert_allclose(bilinear.second_order(x)[0].detach(), (outer / u.norm())[rows, cols], rtol=1e-4, atol=1e-6)
    fused = bilinear(x)[0].detach()
    expected = torch.cat([F.normalize(v, dim=0), F.normalize(outer[rows, cols], dim=0)]) / 2 ** 0.5
    assert torch.allclose(fused, expected, atol=1e-5)


def test_second_order_gradients_reach_the_reduction_and_gem():
    torch.manual_seed(1)
    pool = GeMSecondOrder(in_channels=6, reduction_dim=3, iterations=5, centred=True)
    out = pool(torch.rand(2, 6, 4, 4))
    (out * torch.randn_like(out)).sum().backward()
    for p in (pool.reduction.weight, pool.reduction.bias, pool.gem.p):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_newton_schulz_approximates_the_matrix_square_root():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a = q @ np.diag([4.0, 3.0, 2.5, 2.0, 1.5]) @ q.T
    exact = q @ np.diag(np.sqrt([4.0, 3.0, 2.5, 2.0, 1.5])) @ q.T
    approx = sqrtm_newton_schulz(torch.from_numpy(a)[None], iterations=12)[0].numpy()
    np.testing.assert_allclose(approx, exact, atol=1e-6)


def test_lite0_second_order_dim():
    net = RetrievalNet.create("tf_efficientnet_lite0", "gem_second_order", 64, None, pooling_args=SECOND_ORDER)
    assert net.meta["dim"] == 1280 + 64 * 65 // 2 == 3360


# ---------------------------------------------------------------- MOP


@pytest.mark.parametrize("region_pooling", ["mac", "gem"])
def test_mop_of_one_bright_region(region_pooling):
    # 6×6 map, 2 channels: channel 0 is 1 everywhere (background), channel 1 is 10 on the top-left 2×2 block only.
    x = torch.zeros(1, 2, 6, 6)
    x[0, 0] = 1.0
    x[0, 1, :2, :2] = 10.0
    pool = MOP(levels=(1, 2, 3), region_pooling=region_pooling, p=3.0)
    out = pool(x)[0]
    assert out.shape == (6,) and pool.output_dim(2) == 6 and torch.allclose(out.norm(), torch.tensor(1.0))
    levels = out.reshape(3, 2) * 3 ** 0.5  # the three L2-normalised levels, concatenated, then L2
    for g, level in zip((1, 2, 3), levels):
        # level g: g² cells; the bright block lies in one cell (all of it for g = 2, 3; the whole map for g = 1), the
        # other g² − 1 cells are pure background → L2((g² − 1)·e₀ + L2(pool of the bright cell))
        cell = x[0, :, : 6 // g, : 6 // g]
        bright = cell.amax(dim=(-2, -1)) if region_pooling == "mac" else cell.pow(3).mean(dim=(-2, -1)).pow(1 / 3)
        expected = F.normalize(F.normalize(bright, dim=0) + torch.tensor([g * g - 1.0, 0.0]), dim=0)
        assert torch.allclose(level, expected, atol=1e-5), (g, level, expected)
    # the finer the grid, the smaller the bright region's share of its level
    assert levels[0, 1] > levels[1, 1] > levels[2, 1] > 0


def test_mop_pools_maps_smaller_than_its_grid():
    out = MOP(levels=(1, 2, 3), region_pooling="gem")(torch.rand(2, 4, 2, 2))  # 3×3 cells of a 2×2 map overlap
    assert out.shape == (2, 12) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="distinct"):
        MOP(levels=(2, 2))


@pytest.mark.parametrize("region_pooling", ["mac", "gem"])
def test_mop_cells_are_adaptive_pooling_cells(region_pooling):
    x = torch.rand(2, 5, 7, 5)
    pool = MOP(levels=(1, 2, 3, 4), region_pooling=region_pooling, p=3.0)
    for g in (1, 2, 3, 4, 8):
        expected = (F.adaptive_max_pool2d(x, g) if region_pooling == "mac"
                    else F.adaptive_avg_pool2d(x.clamp(min=1e-6).pow(3.0), g).pow(1 / 3.0))
        assert torch.allclose(pool.cells(x, g), expected.flatten(2), atol=1e-6)


# ---------------------------------------------------------------- ONNX


@pytest.mark.parametrize("pooling, args", [("netvlad", NETVLAD), ("gem_second_order", SECOND_ORDER), ("mop", MOP_ARGS)])
def test_each_pooling_exports_to_onnx_with_parity(tmp_path, pooling, args):
    from PIL import Image

    from components.export.onnx import check_parity, export_onnx
    from tests.conftest import REPO

    torch.manual_seed(0)
    net = RetrievalNet.create("tf_efficientnet_lite0", pooling, 96, None, pooling_args=args).eval()
    net.meta = {**net.meta, "scales": [1.0, 0.7071]}
    images = [Image.open(f).convert("RGB") for f in sorted((REPO / "data/sample/Mallard").iterdir())[:2]]
    export_onnx(net, tmp_path / "m.onnx")
    assert check_parity(net, tmp_path / "m.onnx", images) <= 1e-4


# ---------------------------------------------------------------- one epoch through the retrieval loop


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_retrieval_data(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("pooling, args, dim", [
    ("netvlad", {"clusters": 4, "reduction_dim": 32, "alpha": 50.0}, 128),
    ("gem_second_order", {"reduction_dim": 8, "iterations": 3, "centred": True}, 1280 + 36),
    ("mop", {"levels": [1, 2], "region_pooling": "gem"}, 2 * 1280),
    ("multi_level", {"stages": [2, 4], "channels": 32, "pooling": "gem"}, 32),
])
def test_pooling_trains_one_epoch_and_its_checkpoint_reloads(data, tmp_path, pooling, args, dim):
    train, val = data
    job = RetrievalJob(
        net=NetSpec("tf_efficientnet_lite0", pooling, 3.0, 48, None, frozen_stages=6, pooling_args=args),
        optim=Optimisation(1, 4, 0.01, 0.9, 0.0, 10, 0.1, (40, 48), True, 0),
        train=train, retrieval_val=val, criterion=contrastive(0.5, 1.2), sampler=random_pairs(2, 2),
    )
    ctx = LocalContext(tmp_path / "ckpt")
    train_retrieval(job, ctx)
    assert [r["epoch"] for r in ctx.reports] == [0, 1]
    assert np.isfinite(ctx.reports[1]["train_loss"]) and 0 < ctx.reports[1]["val_map"] <= 1
    folder = ctx.latest_checkpoint()
    ckpt = read_checkpoint(folder / "best.pt")
    assert ckpt["meta"]["pooling"] == pooling and ckpt["meta"]["pooling_args"] == args and ckpt["meta"]["dim"] == dim
    assert json.loads(json.dumps(ckpt["meta"])) == ckpt["meta"]  # meta.json holds it as it is
    if pooling == "netvlad":  # k-means ran in the job, before epoch 0, and is kept in the checkpoint
        assert ckpt["state_dict"]["pool.initialised"] == 1
        assert read_train_state(folder)["model"]["net.pool.initialised"] == 1
    if pooling == "multi_level":  # a 1×1 conv per fused level (blocks 2 and 4, then the final map) and its weights
        assert {k for k in ckpt["state_dict"] if k.startswith("pool.")} == {
            "pool.level_logits", "pool.gem.p", *(f"pool.reduce.{i}.{w}" for i in range(3) for w in ("weight", "bias"))}
    # rebuilt from the checkpoint alone, twice over: the same descriptors
    net = load_net(folder / "best.pt")
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d = net(x)
    assert d.shape == (2, dim) and torch.allclose(d.norm(dim=1), torch.ones(2), atol=1e-5)
    rebuilt = RetrievalNet(ckpt["meta"])
    rebuilt.load_state_dict(read_train_state(folder)["tracker"]["best_state"])
    save_checkpoint(tmp_path / "again.pt", net)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), d) and torch.equal(load_net(tmp_path / "again.pt")(x), d)
    # a net that starts from the checkpoint (retrieval init: classifier) keeps its initialised pooling
    assert not initialise_pooling(net, train, 8, 0, ctx.device)


# ---------------------------------------------------------------- old checkpoints


def test_an_old_gem_checkpoint_loads_with_bit_identical_descriptors(tmp_path):
    """A checkpoint as written before poolings took args (meta: pooling "gem", gem_p; no pooling_args)."""
    torch.manual_seed(2)
    net = RetrievalNet.create("tf_efficientnet_lite0", "gem", 64, None, gem_p=3.5).eval()
    assert "pooling_args" not in net.meta and {k for k in net.state_dict() if not k.startswith("backbone.")} == {"pool.p"}
    old_meta = {"arch": "tf_efficientnet_lite0", "pooling": "gem", "gem_p": 3.5, "image_size": 64, "dim": 1280,
                "whitening_dim": None, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "stage": "retrieval"}
    torch.save({"format": 1, "meta": old_meta, "state_dict": net.state_dict()}, tmp_path / "old.pt")
    loaded = load_net(tmp_path / "old.pt")
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        features = loaded.backbone.forward_features(x)
        p = loaded.pool.p
        by_hand = F.normalize(features.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p), dim=-1)
        assert torch.equal(loaded(x), by_hand) and torch.equal(loaded(x), net(x))
    assert loaded.meta == old_meta and loaded.pooled_dim == 1280


def test_plain_poolings_build_as_before():
    assert make_pooling("gem", 2.0).p.item() == 2.0 and make_pooling("mac").output_dim(7) == 7
    with pytest.raises(TypeError):
        make_pooling("netvlad", args={"clusters": 2, "reduction_dim": 2, "alpha": 1.0})  # needs in_channels


# ---------------------------------------------------------------- params


@pytest.mark.parametrize("name, args", [("netvlad", NETVLAD), ("netvlad", {**NETVLAD, "reduction_dim": None}),
                                        ("gem_second_order", SECOND_ORDER), ("mop", MOP_ARGS)])
def test_each_pooling_validates_from_yaml(tmp_path, name, args):
    path = tmp_path / "params.yaml"
    path.write_text(params_with({"model": {"pooling": {"name": name, "args": args}}}))
    params = load_params(path)
    assert params.model.pooling_spec() == Spec(name, args)
    spec = net_spec(params.model)
    assert (spec.pooling, dict(spec.pooling_args)) == (name, args)


def test_plain_pooling_names_still_mean_what_they_did(tmp_path):
    params = load_params()
    assert params.model.pooling == "gem" and params.model.pooling_spec() == Spec("gem")
    spec = net_spec(params.model)
    assert spec.pooling == "gem" and spec.pooling_args is None
    path = tmp_path / "params.yaml"
    path.write_text(params_with({"model": {"pooling": "rmac"}}))
    assert load_params(path).model.pooling == "rmac"


@pytest.mark.parametrize("pooling, message", [
    ({"name": "netvlad", "args": {**NETVLAD, "clusters": 0}}, "model.pooling.netvlad.args.clusters"),
    ({"name": "netvlad", "args": {"clusters": 16, "alpha": 1.0}}, "model.pooling.netvlad.args.reduction_dim: required"),
    ({"name": "netvlad", "args": {**NETVLAD, "alpha": -1.0}}, "model.pooling.netvlad.args.alpha"),
    ({"name": "gem_second_order", "args": {**SECOND_ORDER, "iterations": 0}}, "model.pooling.gem_second_order.args.iterations"),
    ({"name": "gem_second_order", "args": {**SECOND_ORDER, "centred": "yes"}}, "model.pooling.gem_second_order.args.centred"),
    ({"name": "mop", "args": {**MOP_ARGS, "levels": [2, 1]}}, "model.pooling.mop.args: levels must be strictly increasing"),
    ({"name": "mop", "args": {**MOP_ARGS, "levels": []}}, "model.pooling.mop.args.levels"),
    ({"name": "mop", "args": {**MOP_ARGS, "region_pooling": "spoc"}}, "model.pooling.mop.args.region_pooling"),
    ({"name": "mop", "args": {**MOP_ARGS, "stride": 1}}, "model.pooling.mop.args.stride: unknown key"),
    ({"name": "vlad", "args": {}}, "model.pooling: expected mac | spoc | gem | rmac, or {name, args}"),
    ("netvlad", "model.pooling: expected"),  # its args are not optional
    ("avg", "model.pooling: expected"),
])
def test_bad_pooling_args_are_refused_naming_the_key(tmp_path, pooling, message):
    path = tmp_path / "params.yaml"
    path.write_text(params_with({"model": {"pooling": pooling}}))
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert message in str(caught.value)


def test_the_pooling_union_validates_on_its_own():
    assert TypeAdapter(Pooling).validate_python({"name": "mop", "args": MOP_ARGS}).spec() == Spec("mop", MOP_ARGS)


def test_the_off_the_shelf_baseline_starts_netvlad_from_train_features(tmp_path):
    """evaluate/postprocess's off-the-shelf NetVLAD is k-means-initialised from the train classes, as training starts
    it — never random centres."""
    import pandas as pd

    from components.data.contract import Splits
    from pipelines.common import off_the_shelf
    from pipelines.params import load_params
    from tests.conftest import tiny_sample

    rows = tiny_sample(tmp_path / "images", classes=2, per_class=4, max_side=48)
    table = pd.DataFrame({"id": [str(i) for i in range(len(rows))], "label": [l for _, l in rows],
                          "uri": [u for u, _ in rows], "split": "cls_train", "role": "train"})
    path = tmp_path / "params.yaml"
    path.write_text(params_with({"model": {"image_size": 64, "pooling": {
        "name": "netvlad", "args": {"clusters": 4, "reduction_dim": 16, "alpha": 100.0}}}}))
    net = off_the_shelf(load_params(path), Splits(table))
    assert net.pool.is_initialised
    fresh = RetrievalNet.create("tf_efficientnet_lite0", "netvlad", 64, "imagenet",
                                pooling_args={"clusters": 4, "reduction_dim": 16, "alpha": 100.0})
    assert not fresh.pool.is_initialised
    assert not torch.equal(net.pool.centres, fresh.pool.centres)
