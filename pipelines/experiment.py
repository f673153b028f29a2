"""Run the pipeline with a params override file as a DVC experiment, without editing params.yaml by hand:

    .venv/bin/python -m pipelines.experiment configs/caltech101-full.yaml [--dry-run]

An override file (configs/*.yaml) holds only the keys that differ from params.yaml; a mapping merges into the
section it overrides, and a `{name, args}` setting or a search space replaces the one it overrides whole. The merged
params are validated first, then `dvc exp run -n <file stem>` runs with one `--set-param` per overridden value, so DVC records
the experiment next to its baseline (`dvc exp show`). As with any `dvc exp run`, the workspace is left with the
experiment's params.yaml and outputs: `git checkout params.yaml` (or `dvc exp apply`) goes back.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from pipelines.params import DEFAULT_PARAMS, ParamsError, load_params, read_overrides, replaces_whole


def set_params(overrides: dict[str, Any], prefix: str = "") -> list[str]:
    """DVC's `--set-param` values (Hydra overrides) that apply `overrides`: `key=value` per leaf; a value that
    `replaces_whole` is removed and added anew (`~key`, then `+key=...`)."""
    flags = []
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if replaces_whole(value):
            flags += [f"~{path}", f"+{path}={_value(value)}"]
        elif isinstance(value, dict):
            flags += set_params(value, f"{path}.")
        else:
            flags.append(f"{path}={_value(value)}")
    return flags


def _value(value: Any) -> str:
    """A Hydra override value: JSON is valid Hydra for numbers, booleans, null, lists and mappings of them, and a
    quoted string for text."""
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return json.dumps(value)


def main(config: Path = typer.Argument(..., help="an override file, e.g. configs/caltech101-full.yaml"),
         dry_run: bool = typer.Option(False, "--dry-run", help="print the dvc command instead of running it")) -> None:
    try:
        load_params(DEFAULT_PARAMS, config)  # the merged params must be valid before DVC runs anything
        overrides = read_overrides(config)
    except ParamsError as e:
        typer.echo(f"firesight experiment: error: {e}", err=True)
        raise typer.Exit(2) from None
    command = [str(Path(sys.executable).parent / "dvc"), "exp", "run", "-n", config.stem]
    for flag in set_params(overrides):
        command += ["--set-param", flag]
    if dry_run:
        typer.echo(" ".join(command))
        return
    os.execv(command[0], command)


if __name__ == "__main__":
    typer.run(main)
