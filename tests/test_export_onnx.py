import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from components.export.onnx import META_KEY, PARITY_TOLERANCE, ExportError, OnnxDescriber, check_parity, export_onnx
from components.models.net import RetrievalNet

from tests.conftest import REPO, SAMPLE

IMAGE_SIZE = 96
CONFIGS = {"plain": ([1.0], None), "whitened-2-scales": ([1.0, 0.7071], 64), "plain-2-scales": ([1.0, 1.3], None)}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Real bird photos (224×224) cropped and resized to other aspect ratios and sizes: landscape, portrait, a thin
    strip, one smaller than the model's side (upsampled), one larger, and one already at the side."""
    birds = [Image.open(f).convert("RGB") for f in sorted(SAMPLE.glob("*/0001.jpg"))[:6]]
    return [birds[0], birds[1].crop((0, 30, 224, 180)), birds[2].crop((40, 0, 140, 224)),
            birds[3].crop((0, 0, 224, 57)), birds[4].resize((60, 45), Image.BICUBIC),
            birds[5].resize((IMAGE_SIZE, 70), Image.BICUBIC)]


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory) -> tuple[RetrievalNet, Path]:
    """An ImageNet lite0 net (scales and whitening per CONFIGS) exported, in train mode, to model.onnx."""
    scales, whitening_dim = CONFIGS[request.param]
    net = RetrievalNet.create("tf_efficientnet_lite0", "gem", IMAGE_SIZE, weights="imagenet")
    net.meta["scales"] = scales
    if whitening_dim is not None:
        rng = np.random.default_rng(0)
        net.set_whitening(rng.normal(size=net.pooled_dim).astype(np.float32) * 0.01,
                          rng.normal(size=(whitening_dim, net.pooled_dim)).astype(np.float32))
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    export_onnx(net.train(), path)
    assert net.training  # the export leaves the net's mode as it was
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # written atomically: no temporary left
    return net.eval(), path


@pytest.mark.parametrize("batch", [1, 3, 6])
def test_onnx_descriptors_match_torch(exported, images, batch):
    net, path = exported
    assert check_parity(net, path, images[:batch]) <= PARITY_TOLERANCE
    d = OnnxDescriber(path, threads=1).describe(images[:batch])
    assert d.dtype == np.float32 and d.shape == (batch, net.meta["dim"])
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)


def test_a_batch_does_not_change_an_image_descriptor(exported, images):
    describer = OnnxDescriber(exported[1], threads=1)
    alone = np.concatenate([describer.describe([image]) for image in images])
    np.testing.assert_allclose(describer.describe(images), alone, atol=1e-6)
    assert describer.describe([]).shape == (0, exported[0].meta["dim"])


def test_height_and_width_are_dynamic(exported):
    net, path = exported
    describer = OnnxDescriber(path, threads=1)
    scaled = [torch.randn(2, 3, 80, 112) for _ in describer.input_names]
    with torch.no_grad():
        expected = net.describe(scaled).numpy()
    actual = describer.session.run(None, dict(zip(describer.input_names, (x.numpy() for x in scaled))))[0]
    np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_the_meta_round_trips(exported):
    net, path = exported
    assert OnnxDescriber(path).meta == net.meta
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(props[META_KEY]) == net.meta


def test_describing_needs_no_torch(exported, tmp_path):
    net, path = exported
    image = sorted(SAMPLE.glob("*/0002.jpg"))[0]
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from PIL import Image
        from components.export.onnx import OnnxDescriber
        d = OnnxDescriber({str(path)!r}, threads=1).describe([Image.open({str(image)!r}).convert("RGB")])
        assert "torch" not in sys.modules and "torchvision" not in sys.modules, "torch was imported"
        np.save({str(tmp_path / "d.npy")!r}, d)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    d = np.load(tmp_path / "d.npy")
    assert d.shape == (1, net.meta["dim"])
    assert check_parity(net, path, [Image.open(image).convert("RGB")]) <= PARITY_TOLERANCE


def test_a_network_that_differs_fails_the_parity_check(exported, images):
    import copy

    net, path = exported
    changed = copy.deepcopy(net)
    with torch.no_grad():
        changed.pool.p.add_(0.5)
    with pytest.raises(ExportError, match=rf"{path}: ONNX descriptors differ .* max \|Δ\| = \d"):
        check_parity(changed, path, images[:2])


def test_missing_corrupt_or_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(ExportError, match=f"not found: {tmp_path / 'none.onnx'}"):
        OnnxDescriber(tmp_path / "none.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not a protobuf" * 10)
    with pytest.raises(ExportError, match=f"{corrupt}: not a readable ONNX model"):
        OnnxDescriber(corrupt)
    foreign = tmp_path / "foreign.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("x", onnx.TensorProto.FLOAT, [1])],
                                   [value("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), foreign)
    with pytest.raises(ExportError, match=f"{foreign}: not a Firesight descriptor model"):
        OnnxDescriber(foreign)
