"""Describers: images in, L2-normalised descriptors out, each carrying the identity of the model that made them
(`meta["weights_sha256"]`), so an index never mixes descriptor spaces. The torch describer lives here; the
onnxruntime one (no torch at query time) in components/export/onnx.py."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

import numpy as np
from PIL import Image

DIGEST_KEY = "weights_sha256"
# the meta fields that, with the weights, decide a descriptor: the same weights at another resolution are another space
_DESCRIPTOR_META = ("arch", "pooling", "gem_p", "image_size", "scales", "mean", "std", "whitening_dim")
_DESCRIPTOR_META_IF_SET = ("pooling_args", "object_crop", "draft_decode")  # hashed only when set: older digests stay what they were


class Describer(Protocol):
    meta: dict[str, Any]  # the network's meta, with DIGEST_KEY

    def describe(self, images: list[Image.Image]) -> np.ndarray:
        """float32 (len(images), meta["dim"]) L2-normalised descriptors."""
        ...


def model_digest(net) -> str:
    """sha256 of what makes `net`'s descriptors: every state_dict tensor (name, dtype, shape, bytes) and the meta
    fields that preprocess and pool (resolution, scales, normalisation)."""
    import torch

    h = hashlib.sha256()
    described = {k: net.meta.get(k) for k in _DESCRIPTOR_META}
    described.update({k: net.meta[k] for k in _DESCRIPTOR_META_IF_SET if net.meta.get(k)})
    h.update(json.dumps(described, sort_keys=True).encode())
    for name, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class TorchDescriber:
    """A RetrievalNet describing PIL images as the index stage does (its meta's resolution, scales and whitening)."""

    def __init__(self, net, batch_size: int = 16) -> None:
        from components.data.transforms import BatchTransform
        from components.models.localise import object_crop_of

        self.net = net.eval()
        self.meta = {**net.meta, DIGEST_KEY: model_digest(net)}
        self.batch_size = batch_size
        self._transforms = BatchTransform.for_scales(net.meta)
        self._crop = object_crop_of(net.meta)

    def describe(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        from components.models.localise import cropped

        out = [np.zeros((0, self.meta["dim"]), dtype=np.float32)]
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = [(im,) for im in cropped(self.net, images[start:start + self.batch_size], self._crop)]
                out.append(self.net.describe([t(batch)[0] for t in self._transforms]).float().numpy())
        return np.concatenate(out).astype(np.float32)
