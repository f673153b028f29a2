"""Where the last ablation row loses: αQE alone vs PCA-whitening at several output sizes, on one trained model.

    python tools/whitening_probe.py    # in a checkout where `dvc repro` has built data/ and models/retrieval

Whitening is always learned on the train classes; descriptors are embedded once and whitened in numpy.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from components.evaluation.protocol import score_queries
from components.models.net import load_net
from components.models.whitening import fit_pca_whitening
from components.search.embed import embed_images


def whiten(x: np.ndarray, mean: np.ndarray, projection: np.ndarray) -> np.ndarray:
    y = (x - mean) @ projection.T
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    splits = pd.read_parquet("data/splits.parquet")
    net = load_net(Path("models/retrieval/best.pt"))
    size = net.meta["image_size"]
    test = splits[splits["split"] == "test"]
    queries, db = test[test["role"] == "query"], test[test["role"] == "db"]
    embed = lambda rows: embed_images(net, rows["uri"].tolist(), batch_size=32, image_size=size)[1]
    train_desc, q_desc, db_desc = embed(splits[splits["role"] == "train"]), embed(queries), embed(db)
    results = {"no whitening": score_queries(q_desc, queries["label"], db_desc, db["label"])[0]["map"],
               "αQE (k=5, α=3)": score_queries(q_desc, queries["label"], db_desc, db["label"], qe_k=5, qe_alpha=3)[0]["map"]}
    for dim in (None, 512, 256, 128):
        mean, projection = fit_pca_whitening(train_desc, dim)
        qw, dw = whiten(q_desc, mean, projection), whiten(db_desc, mean, projection)
        name = f"whitening to {dim or train_desc.shape[1]}"
        results[name] = score_queries(qw, queries["label"], dw, db["label"])[0]["map"]
        results[name + " + αQE"] = score_queries(qw, queries["label"], dw, db["label"], qe_k=5, qe_alpha=3)[0]["map"]
    print(json.dumps({k: round(v, 4) for k, v in results.items()}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
