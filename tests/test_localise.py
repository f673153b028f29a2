"""Object crops: the activation box holds the peak and its region, maps back through the resize and padding, and
every describer crops as the model's meta says."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from components.catalog.describe import TorchDescriber, model_digest
from components.data.transforms import BatchTransform
from components.export.onnx import ExportError, export_onnx
from components.models.localise import ObjectCrop, activation_boxes, cropped, image_box, object_boxes
from components.models.net import RetrievalNet
from components.search.embed import embed_images

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class _Backbone(nn.Module):
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """A 32-px-stride map that lights up where the image differs from the normalisation mean."""
        return F.avg_pool2d(x.abs().sum(dim=1, keepdim=True), 32)


class _ContrastNet(nn.Module):
    """A stand-in whose activation map is known: what object_boxes needs of a network (meta, backbone)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _Backbone()
        self.meta = {"image_size": 224, "mean": list(MEAN), "std": list(STD)}


def _scene(size=(300, 200), patch=(200, 40, 260, 100), seed=0) -> Image.Image:
    """A mean-grey image (zero after normalisation) with a noisy patch (left, top, right, bottom)."""
    pixels = np.full((size[1], size[0], 3), 128, dtype=np.uint8)
    left, top, right, bottom = patch
    pixels[top:bottom, left:right] = np.random.default_rng(seed).integers(0, 256, (bottom - top, right - left, 3))
    return Image.fromarray(pixels)


def test_the_box_is_the_connected_region_of_the_peak_only():
    a = torch.zeros(1, 2, 6, 6)
    a[0, 0, 1:3, 1:4] = 1.0  # the peak's region: rows 1-2, cols 1-3
    a[0, 0, 1, 2] = 2.0  # the peak
    a[0, 1, 5, 5] = 1.5  # a second, disconnected blob above the threshold
    a[0, 0, 4, 0] = -5.0  # negative activations count as none
    assert activation_boxes(a, 0.3).tolist() == [[1, 1, 3, 4]]
    assert activation_boxes(a, 0.8).tolist() == [[1, 2, 2, 3]]  # only the peak is >= 0.8 x 2
    assert activation_boxes(torch.zeros(1, 3, 4, 5), 0.2).tolist() == [[0, 0, 4, 5]]  # flat: the whole map


def test_cells_map_back_through_the_resize_and_the_padding():
    # 300x200 at side 224: scale 224/300, resized 224x149, padded 37 rows on top; 7x7 cells of 32 px
    scale = 224 / 300
    assert image_box((2, 4, 4, 6), (7, 7), 224, (300, 200), margin=0.0) == (
        int(np.floor(128 / scale)), int(np.floor((64 - 37) / scale)), int(np.ceil(192 / scale)), int(np.ceil((128 - 37) / scale)))
    assert image_box((0, 0, 7, 7), (7, 7), 224, (300, 200), margin=0.3) == (0, 0, 300, 200)  # clipped to the image
    assert image_box((0, 0, 1, 7), (7, 7), 224, (300, 200), margin=0.0) == (0, 0, 300, 200)  # padding only: all of it
    left, top, right, bottom = image_box((2, 2, 4, 4), (7, 7), 224, (224, 224), margin=0.5)
    assert (left, top, right, bottom) == (32, 32, 160, 160)  # 64..128 grown by 32 on each side


def test_the_crop_holds_the_object_and_drops_most_of_the_clutter():
    net, image, patch = _ContrastNet(), _scene(), (200, 40, 260, 100)
    (left, top, right, bottom), = object_boxes(net, [image], ObjectCrop(threshold=0.2, margin=0.1))
    assert left <= patch[0] and top <= patch[1] and right >= patch[2] and bottom >= patch[3]
    assert (right - left) * (bottom - top) < 0.25 * image.width * image.height
    crop, = cropped(net, [image], ObjectCrop(0.2, 0.1))
    assert crop.size == (right - left, bottom - top)
    assert cropped(net, [image], None)[0] is image


SCENES = [((300, 200), (200, 40, 260, 100)), ((120, 160), (10, 20, 60, 90))]  # (size, patch)


@pytest.fixture(scope="module")
def net() -> RetrievalNet:
    return RetrievalNet.create("tf_efficientnet_lite0", "gem", image_size=224, weights="imagenet").eval()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("scenes")
    paths = []
    for i, (size, patch) in enumerate(SCENES):
        _scene(size, patch, seed=i).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


def test_imagenet_activations_find_the_object_in_a_plain_scene(net, image_files):
    images = [Image.open(p).convert("RGB") for p in image_files]
    for (left, top, right, bottom), image, (_, patch) in zip(object_boxes(net, images, ObjectCrop(0.5, 0.05)), images,
                                                            SCENES, strict=True):
        assert left <= patch[0] and top <= patch[1] and right >= patch[2] and bottom >= patch[3]
        assert (right - left) * (bottom - top) < 0.5 * image.width * image.height


def test_every_describer_crops_as_the_meta_says(net, image_files, monkeypatch):
    crop = ObjectCrop(0.5, 0.05)
    images = [Image.open(p).convert("RGB") for p in image_files]
    batch, = BatchTransform.for_eval(net.meta)([(im,) for im in cropped(net, images, crop)])
    with torch.no_grad():
        expected = net(batch).numpy()
    plain = embed_images(net, image_files, batch_size=2)[1]
    np.testing.assert_allclose(embed_images(net, image_files, batch_size=2, object_crop=crop)[1], expected, atol=1e-6)
    assert not np.allclose(plain, expected, atol=1e-3)  # the crop changes what is described
    digest = model_digest(net)
    monkeypatch.setitem(net.meta, "object_crop", {"threshold": 0.5, "margin": 0.05})
    np.testing.assert_allclose(embed_images(net, image_files, batch_size=2)[1], expected, atol=1e-6)
    np.testing.assert_allclose(TorchDescriber(net).describe(images), expected, atol=1e-6)
    assert model_digest(net) != digest  # another descriptor space: an index refuses to mix them


def test_onnx_export_refuses_a_model_that_crops(net, tmp_path, monkeypatch):
    monkeypatch.setitem(net.meta, "object_crop", {"threshold": 0.2, "margin": 0.1})
    with pytest.raises(ExportError, match="torch engine"):
        export_onnx(net, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("args", [{"threshold": 0.0}, {"threshold": 1.5}, {"margin": -0.1}])
def test_bad_crop_settings_raise(args):
    with pytest.raises(ValueError, match="object crop"):
        ObjectCrop(**args)
