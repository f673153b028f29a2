"""The registered pyfunc model, logged as code (MLflow models-from-code): loading it from the registry runs this
file instead of unpickling an object, and the weights load from the checkpoint artifact with `weights_only=True`."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np


class EmbeddingModel(mlflow.pyfunc.PythonModel):
    """A batch of RGB uint8 images (B, H, W, 3) → L2-normalised descriptors (B, dim)."""

    def load_context(self, context) -> None:
        from components.catalog.describe import TorchDescriber
        from components.models.net import load_net

        self.describer = TorchDescriber(load_net(Path(context.artifacts["checkpoint"])))  # as `firesight` describes

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        from PIL import Image

        return self.describer.describe([Image.fromarray(img) for img in np.asarray(model_input, dtype=np.uint8)])


mlflow.models.set_model(EmbeddingModel())
