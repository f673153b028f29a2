"""Multi-level feature fusion (`multi_level`): the maps of several backbone stages max-pooled to the final map's size,
1×1-convolved to one channel count, summed with learnable softmax weights, GeM- or SPoC-pooled — selected from params,
trained end to end through the one retrieval loop, exported to ONNX; single-level nets are unchanged."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.models.backbones import create_backbone, forward_stages, stage_layout
from components.models.net import RetrievalNet
from components.models.pooling import MultiLevel, make_pooling
from components.registry import Spec
from pipelines.common import net_spec
from pipelines.params import ParamsError, load_params
from tests.conftest import params_with

LITE0 = "tf_efficientnet_lite0"
DEFAULTS = {"stages": [2, 4], "channels": 512, "pooling": "gem"}  # MultiLevel's defaults, as params would set them
LITE0_CHANNELS = (16, 24, 40, 80, 112, 192, 320, 1280)  # blocks 0-6, then the final map (after conv_head)
LITE0_STRIDES = (2, 4, 8, 16, 16, 32, 32, 32)


def _multi_level(args=None, image_size: int = 64) -> RetrievalNet:
    return RetrievalNet.create(LITE0, "multi_level", image_size, None, pooling_args=args)


# ---------------------------------------------------------------- the net and its stages


def test_lite0_stage_layout_and_the_final_map_is_forward_features():
    torch.manual_seed(0)
    backbone = create_backbone(LITE0, None).module.eval()
    assert stage_layout(backbone) == (LITE0_CHANNELS, LITE0_STRIDES)
    x = torch.randn(2, 3, 70, 53)
    with torch.no_grad():
        maps = forward_stages(backbone, x, [1, 3, 5])
        assert [m.shape[1] for m in maps] == [24, 80, 192, 1280]
        assert torch.equal(maps[-1], backbone.forward_features(x))


def test_lite0_output_dims_and_whitening_follow():
    net = _multi_level().eval()  # no args: the defaults
    assert net.pooled_dim == net.meta["dim"] == 512 and "pooling_args" not in net.meta
    assert net.pool.stages == (2, 4) and net.pool.kernels == (4, 2, 1)
    assert [conv.in_channels for conv in net.pool.reduce] == [40, 112, 1280]
    net = _multi_level({"stages": [3, 4, 6], "channels": 256, "pooling": "spoc"}).eval()
    assert net.meta["dim"] == 256 and net.meta["pooling_args"]["stages"] == [3, 4, 6] and net.pool.gem is None
    assert [conv.in_channels for conv in net.pool.reduce] == [80, 112, 320, 1280] and net.pool.kernels == (2, 2, 1, 1)
    with torch.no_grad():
        d = net(torch.randn(3, 3, 64, 48))
    assert d.shape == (3, 256) and torch.allclose(d.norm(dim=1), torch.ones(3), atol=1e-5)
    net.set_whitening(np.zeros(256, np.float32), np.eye(8, 256, dtype=np.float32))
    assert net.meta["dim"] == 8


@pytest.mark.parametrize("h, w", [(97, 75), (64, 64), (33, 129)])
def test_max_pool_alignment_gives_the_final_maps_size_for_odd_inputs(h, w):
    torch.manual_seed(1)
    net = _multi_level({"stages": [0, 2, 4, 6], "channels": 8, "pooling": "gem"}).eval()
    with torch.no_grad():
        maps = net.features(torch.randn(1, 3, h, w))
        aligned = net.pool.align(maps)
    final = maps[-1].shape[-2:]
    assert final == (-(-h // 32), -(-w // 32))
    assert all(a.shape[-2:] == final for a in aligned) and [a.shape[1] for a in aligned] == [16, 40, 112, 320, 1280]
    for x, a, k in zip(maps, aligned, net.pool.kernels):  # each cell: the max of its k×k window (the last ones cut)
        for i in range(final[0]):
            for j in range(final[1]):
                assert torch.equal(a[0, :, i, j], x[0, :, i * k:(i + 1) * k, j * k:(j + 1) * k].amax(dim=(-2, -1)))


def _randomised(pool: MultiLevel) -> MultiLevel:
    """Every level's 1×1 conv random (the earlier ones start at zero), so each level counts."""
    with torch.no_grad():
        for conv in pool.reduce:
            conv.weight.normal_()
            conv.bias.normal_()
    return pool


def test_fusion_is_the_softmax_weighted_sum_of_the_levels_then_the_pooling():
    torch.manual_seed(2)
    pool = _randomised(MultiLevel((4, 6, 8), (2, 4, 4), stages=(0, 1), channels=5, pooling="gem", p=2.0))
    with torch.no_grad():
        pool.level_logits.copy_(torch.tensor([0.5, -1.0, 2.0]))
    maps = [torch.rand(2, 4, 9, 7), torch.rand(2, 6, 5, 4), torch.rand(2, 8, 5, 4)]
    weights = torch.tensor([0.5, -1.0, 2.0]).softmax(0)
    aligned = [F.max_pool2d(maps[0], 2, 2, ceil_mode=True), maps[1], maps[2]]
    fused = sum(wt * conv(x) for wt, conv, x in zip(weights, pool.reduce, aligned))
    by_hand = fused.clamp(min=1e-6).pow(2.0).mean(dim=(-2, -1)).pow(0.5)
    assert torch.allclose(pool(maps), by_hand, atol=1e-6) and pool.output_dim(8) == 5
    spoc = _randomised(MultiLevel((4, 6, 8), (2, 4, 4), stages=(0, 1), channels=5, pooling="spoc"))
    assert torch.allclose(spoc(maps), spoc.fuse(maps).mean(dim=(-2, -1)))


@pytest.mark.parametrize("pooling", ["gem", "spoc"])
def test_untrained_fusion_starts_as_the_final_maps_pooling_and_training_adds_the_earlier_levels(pooling):
    torch.manual_seed(7)
    backbone_weights = RetrievalNet.create(LITE0, "gem", 64, None).backbone.state_dict()
    plain = RetrievalNet.create(LITE0, pooling, 64, None)
    fused = _multi_level({"stages": [2, 4], "channels": 1280, "pooling": pooling})
    for net in (plain, fused):
        net.backbone.load_state_dict(backbone_weights)
        net.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(fused(x), plain(x), atol=1e-5)  # the single-level start, exactly
    fused.freeze(8)  # only the fusion trains
    optimiser = torch.optim.SGD([p for p in fused.pool.parameters()], lr=0.1)
    d = fused(x)
    (d * torch.randn_like(d)).sum().backward()
    optimiser.step()
    assert all(conv.weight.abs().sum() > 0 for conv in fused.pool.reduce[:-1])  # the earlier levels now count
    with torch.no_grad():
        assert not torch.allclose(fused(x), plain(x), atol=1e-4)
    other = _multi_level({"stages": [2, 4], "channels": 64, "pooling": pooling})  # another width: a random start
    assert other.pool.reduce[-1].weight.abs().sum() > 0 and other.pool.reduce[0].weight.abs().sum() == 0


def test_bad_constructor_args_are_refused():
    layout = ((4, 6, 8), (2, 4, 4))
    for stages, match in [((1, 0), "strictly increasing"), ((), "strictly increasing"), ((0, 2), "0..1"),
                          ((-1, 1), "0..1")]:
        with pytest.raises(ValueError, match=match):
            make_pooling("multi_level", args={"stages": stages}, stage_layout=layout)
    with pytest.raises(ValueError, match="0..6 of this backbone"):  # a net checks against its own backbone
        _multi_level({"stages": [2, 7], "channels": 8, "pooling": "gem"})
    with pytest.raises(ValueError, match="EfficientNet-style"):
        RetrievalNet.create("resnet18", "multi_level", 64, None)
    with pytest.raises(ValueError, match="expected 3 maps"):
        make_pooling("multi_level", args={"stages": (0, 1)}, stage_layout=layout)([torch.rand(1, 8, 2, 2)])


# ---------------------------------------------------------------- gradients and frozen stages


def test_gradients_reach_every_fused_stage_and_every_unfrozen_backbone_stage():
    torch.manual_seed(3)
    net = _multi_level({"stages": [2, 4], "channels": 16, "pooling": "gem"})
    net.freeze(3)  # the stem and blocks 0, 1
    net.train()
    frozen = {n: p.detach().clone() for n, p in net.backbone.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("conv_stem", "bn1", "blocks.0.", "blocks.1.")) for n in frozen)
    optimiser = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    d = net(torch.randn(4, 3, 64, 64))
    (d * torch.randn_like(d)).sum().backward()
    for name, p in net.pool.named_parameters():  # each level's 1×1 conv, the level weights, GeM's p
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert len(net.pool.reduce) == 3
    for part in ["blocks.2.", "blocks.3.", "blocks.4.", "blocks.5.", "blocks.6.", "conv_head.", "bn2."]:
        grads = [p.grad for n, p in net.backbone.named_parameters() if n.startswith(part)]
        assert grads and all(g is not None for g in grads), part
        assert sum(g.abs().sum() for g in grads) > 0, part
    assert all(p.grad is None for n, p in net.backbone.named_parameters() if n in frozen)
    optimiser.step()
    assert all(torch.equal(p, frozen[n]) for n, p in net.backbone.named_parameters() if n in frozen)


# ---------------------------------------------------------------- single-level nets unchanged


def test_a_plain_gem_net_gives_the_same_descriptor_as_before():
    """The pre-multi-level path, by hand: L2(GeM(backbone.forward_features(x)))."""
    torch.manual_seed(4)
    net = RetrievalNet.create(LITE0, "gem", 64, None, gem_p=3.5).eval()
    assert {k for k in net.state_dict() if not k.startswith("backbone.")} == {"pool.p"} and not net.pool.multi_level
    x = torch.randn(2, 3, 71, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = net.backbone.forward_features(x)
        p = net.pool.p
        by_hand = F.normalize(features.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p), dim=-1)
        assert torch.equal(net.features(x), features) and torch.equal(net(x), by_hand)


@pytest.mark.parametrize("pooling, args", [("mac", None), ("spoc", None), ("rmac", None),
                                           ("mop", {"levels": [1, 2], "region_pooling": "gem"})])
def test_single_level_poolings_pool_the_final_map(pooling, args):
    torch.manual_seed(5)
    net = RetrievalNet.create(LITE0, pooling, 64, None, pooling_args=args).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(net.pooled(x), net.pool(net.backbone.forward_features(x)))


# ---------------------------------------------------------------- params


@pytest.mark.parametrize("args", [DEFAULTS, {"stages": [3, 4, 6], "channels": 256, "pooling": "spoc"},
                                  {"stages": [6], "channels": 1, "pooling": "gem"}])
def test_multi_level_validates_from_yaml(tmp_path, args):
    path = tmp_path / "params.yaml"
    path.write_text(params_with({"model": {"pooling": {"name": "multi_level", "args": args}},
                                 "retrieval": {"cache_frozen_trunk": False}}))
    params = load_params(path)
    assert params.model.pooling_spec() == Spec("multi_level", args)
    spec = net_spec(params.model)
    assert (spec.pooling, dict(spec.pooling_args)) == ("multi_level", args)


@pytest.mark.parametrize("args, message", [
    ({**DEFAULTS, "stages": [2, 7]}, "model.pooling.multi_level.args.stages.1: Input should be less than or equal to 6"),
    ({**DEFAULTS, "stages": [-1, 2]}, "model.pooling.multi_level.args.stages.0"),
    ({**DEFAULTS, "stages": [4, 2]}, "model.pooling.multi_level.args: stages must be strictly increasing"),
    ({**DEFAULTS, "stages": [2, 2]}, "model.pooling.multi_level.args: stages must be strictly increasing"),
    ({**DEFAULTS, "stages": []}, "model.pooling.multi_level.args.stages"),
    ({**DEFAULTS, "channels": 0}, "model.pooling.multi_level.args.channels"),
    ({**DEFAULTS, "pooling": "mac"}, "model.pooling.multi_level.args.pooling"),
    ({"stages": [2, 4], "channels": 512}, "model.pooling.multi_level.args.pooling: required"),
    ({**DEFAULTS, "weights": [1, 1, 1]}, "model.pooling.multi_level.args.weights: unknown key"),
])
def test_bad_multi_level_args_are_refused_naming_the_key(tmp_path, args, message):
    path = tmp_path / "params.yaml"
    path.write_text(params_with({"model": {"pooling": {"name": "multi_level", "args": args}}}))
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert message in str(caught.value)


# ---------------------------------------------------------------- ONNX


@pytest.mark.parametrize("args", [DEFAULTS, {"stages": [3, 4, 6], "channels": 64, "pooling": "spoc"}])
def test_multi_level_exports_to_onnx_with_parity(tmp_path, args):
    from PIL import Image

    from components.export.onnx import check_parity, export_onnx
    from tests.conftest import REPO

    torch.manual_seed(6)
    net = _multi_level(args, image_size=96).eval()
    _randomised(net.pool)
    with torch.no_grad():  # unequal level weights, so each level's share is exported as it is
        net.pool.level_logits.copy_(torch.linspace(-1.0, 1.0, len(net.pool.level_logits)))
    net.meta = {**net.meta, "scales": [1.0, 0.7071]}  # 96 and 68 px: odd stage sizes (68 → 9 → 5 → 3)
    images = [Image.open(f).convert("RGB") for f in sorted((REPO / "data/sample/Mallard").iterdir())[:2]]
    export_onnx(net, tmp_path / "m.onnx")
    assert check_parity(net, tmp_path / "m.onnx", images) <= 1e-4
