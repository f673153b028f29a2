"""The best training-free row on the current split, without training or Ray: the off-the-shelf ImageNet network
against itself with the postprocess stage's choices made on val, both on the two test protocols with class-bootstrap
CIs and the paired gain.

    .venv/bin/python tools/training_free.py [--config configs/cub100-full.yaml] [--output training_free.json]

Needs data/splits.parquet of those params (`dvc repro split`, or the config's `pipelines.experiment` run up to its
split stage). This is the bar the full pipeline's fine-tuning has to clear.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import typer

from pipelines.common import load_splits, off_the_shelf, test_scores
from pipelines.params import DEFAULT_PARAMS, load_params
from pipelines.postprocess import search_model


def main(config: Path | None = typer.Option(None, help="an override file of params.yaml"),
         output: Path = typer.Option(Path("training_free.json"), help="where the figures go")) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    params = load_params(DEFAULT_PARAMS, config)
    boot = (params.evaluate.bootstrap.resamples, params.evaluate.bootstrap.confidence, params.evaluate.bootstrap.seed)
    splits, seconds = load_splits(), {}
    start = time.perf_counter()
    net = off_the_shelf(params, splits)
    base = test_scores(net, splits, params, "off-the-shelf")
    seconds["off-the-shelf test"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        search_net, choice = search_model(net, "off-the-shelf", params, splits, Path(folder))
        seconds["choice on val"] = time.perf_counter() - start - sum(seconds.values())
        free = test_scores(search_net, splits, params, "free wins")
        seconds["free wins test"] = time.perf_counter() - start - sum(seconds.values())
    result = {"off-the-shelf": base.summary(*boot), "off-the-shelf + free wins": free.summary(*boot),
              "gain": free.gain_over(base, *boot), "recipe": choice.recipe.describe(),
              "val_map_start": choice.start_map, "val_map_chosen": choice.best_map, "trials": choice.trials,
              "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    output.write_text(json.dumps(result, indent=1))
    gain = result["gain"]["leave_one_out"]["map"]
    typer.echo(f"leave-one-out test mAP: off-the-shelf {result['off-the-shelf']['leave_one_out']['map']['value']:.4f}, "
               f"with {choice.recipe.describe()} {result['off-the-shelf + free wins']['leave_one_out']['map']['value']:.4f} "
               f"(gain {gain['diff']:+.4f} [{gain['lo']:+.4f}, {gain['hi']:+.4f}]); {output}")


if __name__ == "__main__":
    typer.run(main)
