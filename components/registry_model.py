"""The registered pyfunc model, logged as code (MLflow models-from-code): loading it from the registry runs this
file instead of unpickling an object, and the weights load from the checkpoint artifact with `weights_only=True`."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np


class EmbeddingModel(mlflow.pyfunc.PythonModel):
    """A batch of RGB uint8 images (B, H, W, 3) → L2-normalised descriptors (B, dim)."""

    def load_context(self, context) -> None:
        from components.models.net import load_net

        self.net = load_net(Path(context.artifacts["checkpoint"]))

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch
        from PIL import Image

        from components.data.transforms import BatchTransform

        transforms = BatchTransform.for_scales(self.net.meta)  # the search model's resolution and scales
        images = [(Image.fromarray(img),) for img in np.asarray(model_input, dtype=np.uint8)]
        with torch.no_grad():
            return self.net.describe([transform(images)[0] for transform in transforms]).numpy()


mlflow.models.set_model(EmbeddingModel())
