"""Off-the-shelf screening of the poolings (no training): the ImageNet network at 224 px with each pooling on the
current split — val leave-one-out mAP (what a choice would be made on) and test leave-one-out mAP with its 95% class
bootstrap CI and the paired CI of its difference from GeM. Poolings that start from data (NetVLAD) are initialised
from the train classes as the baselines are (`pipelines.common.off_the_shelf`); learnt layers that have no data
initialisation (second-order's reduction) are random here, so this screens, it does not rank trained heads.

    .venv/bin/python tools/pooling_probe.py [--output pooling_probe.json]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import typer
import yaml

from components.evaluation.validation import val_map
from components.training.context import LocalContext
from pipelines.common import load_splits, off_the_shelf, test_scores, val_set
from pipelines.params import DEFAULT_PARAMS, load_params

POOLINGS = {
    "gem": "gem",
    "mop [1, 2, 3] gem": {"name": "mop", "args": {"levels": [1, 2, 3], "region_pooling": "gem"}},
    "gem + second order r64": {"name": "gem_second_order", "args": {"reduction_dim": 64, "iterations": 5,
                                                                    "centred": True}},
    "netvlad K16 D128": {"name": "netvlad", "args": {"clusters": 16, "reduction_dim": 128, "alpha": 100.0}},
}
IMAGE_SIZE = 224  # lite0's native resolution


def main(output: Path = typer.Option(Path("pooling_probe.json"), help="where the figures go")) -> None:
    splits, rows, scores = load_splits(), {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name, pooling in POOLINGS.items():
            start = time.perf_counter()
            override = Path(folder) / f"{len(rows)}.yaml"
            override.write_text(yaml.safe_dump({"model": {"pooling": pooling, "image_size": IMAGE_SIZE}}))
            params = load_params(DEFAULT_PARAMS, override)
            boot = (params.evaluate.bootstrap.resamples, params.evaluate.bootstrap.confidence,
                    params.evaluate.bootstrap.seed)
            net = off_the_shelf(params, splits)
            scores[name] = test_scores(net, splits, params, name)
            rows[name] = {"dim": net.meta["dim"],
                          "val_loo_map": val_map(net, val_set(splits), params.index.batch_size, LocalContext(Path(folder))),
                          "test_loo_map": scores[name].summary(*boot)["leave_one_out"]["map"]}
            if name != "gem":
                rows[name]["gain_vs_gem"] = scores[name].gain_over(scores["gem"], *boot)["leave_one_out"]["map"]
            rows[name]["seconds"] = round(time.perf_counter() - start, 1)
            typer.echo(f"{name}: {json.dumps(rows[name])}")
    output.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    typer.run(main)
