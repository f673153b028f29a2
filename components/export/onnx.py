"""ONNX export of a RetrievalNet's descriptor, and `OnnxDescriber`: descriptors from the exported file alone, with
onnxruntime and numpy + PIL preprocessing — no torch at query time.

The graph takes one input per scale of meta["scales"] (default [1.0]), `images_i` (B, 3, H, W) float32, normalised
and zero-padded as `BatchTransform` makes them, and outputs `descriptors` (B, dim): `RetrievalNet.describe`, i.e.
L2(Σ_s L2(pool(f(x_s)))) then the whitening layer if any. Batch, height and width are dynamic; `OnnxDescriber`
feeds each scale at round(s · image_size) square. The resize happens outside the graph, in PIL's float ("F") mode:
the separable antialiased triangle filter of torchvision's antialiased bilinear resize of float tensors (in double
rather than float precision), so descriptors match the torch path to ~1e-6; PIL's 8-bit resize, which rounds to
whole levels, would be ~1e-2 off.
The net's meta is stored as JSON in the model's metadata_props under `META_KEY`.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from components.errors import FiresightError
from components.storage import atomic_write_path

if TYPE_CHECKING:
    import torch

    from components.models.net import RetrievalNet

META_KEY = "firesight_meta"
OUTPUT_NAME = "descriptors"
PARITY_TOLERANCE = 1e-4  # max |Δ| between torch and onnxruntime descriptors (both L2-normalised)


class ExportError(FiresightError):
    """An ONNX descriptor model is missing, unreadable, not a Firesight model, or does not reproduce its network."""


def scale_sides(meta: dict[str, Any]) -> list[int]:
    """The square side round(s · image_size) of each scale in meta["scales"] (default [1.0]), as `BatchTransform`."""
    return [round(s * meta["image_size"]) for s in meta.get("scales", [1.0])]


def export_onnx(net: RetrievalNet, path: Path, *, opset: int = 18) -> None:
    """Write `net`'s descriptor (all of meta["scales"], whitening included) to `path` as ONNX, atomically, with its
    meta in the metadata. Check the file with `check_parity` before shipping it. A net whose meta crops objects
    first (`object_crop`) is refused: its crop is a second pass outside one graph."""
    import torch

    if net.meta.get("object_crop"):
        raise ExportError("this model crops each image to its object before describing it (meta object_crop), which "
                          "the ONNX descriptor cannot do: search it with the torch engine")

    sides = scale_sides(net.meta)
    names = [f"images_{i}" for i in range(len(sides))]
    axes = {name: {0: "batch", 2: f"height_{i}", 3: f"width_{i}"} for i, name in enumerate(names)}
    examples = tuple(torch.zeros(2, 3, side, side) for side in sides)
    buffer = io.BytesIO()
    was_training = net.training
    try:
        with warnings.catch_warnings():
            # dynamo=False: the TorchScript exporter (its deprecation warnings silenced); the dynamo exporter needs
            # onnxscript, which is not a dependency
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(_descriptor_module(net).eval(), examples, buffer, dynamo=False, opset_version=opset,
                              input_names=names, output_names=[OUTPUT_NAME],
                              dynamic_axes={**axes, OUTPUT_NAME: {0: "batch"}})
    finally:  # the exporter leaves the module in eval mode
        net.train(was_training)
    model = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(model, {META_KEY: json.dumps(net.meta)})
    with atomic_write_path(path) as tmp:
        onnx.save(model, tmp)


def check_parity(net: RetrievalNet, onnx_path: Path, images: Sequence[Image.Image]) -> float:
    """The max |Δ| between the descriptors of `images` by `net` (as `embed_images` computes them) and by the ONNX
    model at `onnx_path`; `ExportError` naming the file if it is over `PARITY_TOLERANCE`."""
    import torch

    from components.data.transforms import BatchTransform

    batch = [(image,) for image in images]
    was_training = net.training
    net.eval()
    with torch.no_grad():
        expected = net.describe([t(batch)[0] for t in BatchTransform.for_scales(net.meta)]).numpy()
    net.train(was_training)
    actual = OnnxDescriber(onnx_path).describe(list(images))
    if actual.shape != expected.shape:
        raise ExportError(f"{onnx_path}: descriptors of shape {actual.shape}, the network gives {expected.shape}")
    delta = float(np.abs(actual - expected).max())
    if not delta <= PARITY_TOLERANCE:  # NaN fails too
        raise ExportError(f"{onnx_path}: ONNX descriptors differ from the network's by max |Δ| = {delta:.2e} "
                          f"> {PARITY_TOLERANCE:.0e}")
    return delta


def _descriptor_module(net: RetrievalNet) -> torch.nn.Module:
    """`net.describe` taking one positional input per scale, as the exporter calls it."""
    from torch import nn

    class MultiScaleDescriptor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, *scaled: torch.Tensor) -> torch.Tensor:
            return self.net.describe(scaled)

    return MultiScaleDescriptor()


class OnnxDescriber:
    """Descriptors from an exported ONNX model on CPU; the file alone suffices (its meta is in the metadata)."""

    def __init__(self, path: Path, *, threads: int = 0) -> None:
        """threads: onnxruntime's intra-op threads (0: its default, one per physical core)."""
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for corrupt or foreign files
            raise ExportError(f"{path}: not a readable ONNX model: {e}") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if raw is None:
            raise ExportError(f"{path}: not a Firesight descriptor model (no {META_KEY!r} metadata)")
        self._meta = json.loads(raw)
        self.sides = scale_sides(self._meta)
        self.input_names = [i.name for i in self.session.get_inputs()]
        if len(self.input_names) != len(self.sides):
            raise ExportError(f"{path}: {len(self.input_names)} inputs for {len(self.sides)} scales in its meta")

    @property
    def meta(self) -> dict[str, Any]:
        return self._meta

    def describe(self, images: list[Image.Image]) -> np.ndarray:
        """float32 (n, dim) L2-normalised descriptors of 8-bit RGB images (as `load_rgb` gives), one batch."""
        if not images:
            return np.zeros((0, self._meta["dim"]), dtype=np.float32)
        mean, std = np.float32(self._meta["mean"]), np.float32(self._meta["std"])
        feeds = {name: np.stack([_preprocessed(image, side, mean, std) for image in images])
                 for name, side in zip(self.input_names, self.sides)}
        return self.session.run([OUTPUT_NAME], feeds)[0]


def _preprocessed(image: Image.Image, side: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(3, side, side) float32: `BatchTransform.image` in numpy — scale to [0, 1], longer side resized to `side`
    (antialiased bilinear), normalised, zero-padded centred."""
    if image.mode != "RGB":
        raise ValueError(f"expected an 8-bit RGB image, got mode {image.mode}")
    pixels = _resized(np.asarray(image, dtype=np.float32) * np.float32(1 / 255), side)
    h, w = pixels.shape[:2]
    out = np.zeros((3, side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    out[:, top:top + h, left:left + w] = ((pixels - mean) / std).transpose(2, 0, 1)
    return out


def _resized(pixels: np.ndarray, side: int) -> np.ndarray:
    """(h, w, 3) float32 with the longer side resized to `side`, the shorter to ⌊side · short / long⌋ (torchvision's
    sizes), each channel by PIL's float-mode bilinear resampling (antialiased when shrinking)."""
    h, w = pixels.shape[:2]
    if max(h, w) == side:
        return pixels
    short = int(side * min(h, w) / max(h, w))
    size = (side, short) if w > h else (short, side)  # PIL sizes are (width, height)
    channels = (Image.fromarray(np.ascontiguousarray(pixels[..., c])) for c in range(3))  # 2-D float32: mode "F"
    return np.stack([np.asarray(channel.resize(size, Image.BILINEAR)) for channel in channels], axis=-1)
