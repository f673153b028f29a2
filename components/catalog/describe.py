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
    if net.meta.get("pooling_args"):  # only when set: the digests of nets without pooling args stay what they were
        described["pooling_args"] = net.meta["pooling_args"]
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

        self.net = net.eval()
        self.meta = {**net.meta, DIGEST_KEY: model_digest(net)}
        self.batch_size = batch_size
        self._transforms = BatchTransform.for_scales(net.meta)

    def describe(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        out = [np.zeros((0, self.meta["dim"]), dtype=np.float32)]
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = [(im,) for im in images[start:start + self.batch_size]]
                out.append(self.net.describe([t(batch)[0] for t in self._transforms]).float().numpy())
        return np.concatenate(out).astype(np.float32)
