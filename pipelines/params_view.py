"""The params a stage may read: the keys dvc.yaml declares for it (`stages.<name>.params`: a section such as `ray`, or
a dotted key such as `model.image_size`). The stage runner hands a stage a read-only view of its params that raises
`UndeclaredParamsError` on any other section or key, so dvc.yaml stays the one true list of what reruns a stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel
from ruamel.yaml.error import YAMLError

from components.errors import FiresightError
from pipelines.params import DEFAULT_PARAMS, Params, read_yaml

DVC_YAML = Path("dvc.yaml")  # the runner's cwd is the repo root, as when dvc runs a stage
# Where a stage records its runs, not what it computes: every stage may read it, and changing it reruns none.
READ_BY_ANY_STAGE = frozenset({"tracking"})


class UndeclaredParamsError(FiresightError):
    """A stage read a params key that dvc.yaml does not declare for it."""


def declared_params(stage: str, dvc_yaml: Path = DVC_YAML) -> frozenset[str] | None:
    """The params.yaml keys dvc.yaml declares for `stage`; None (no restriction) without a dvc.yaml, for a stage it
    does not list, or for a stage that takes all of params.yaml."""
    try:
        stages = read_yaml(dvc_yaml.read_text(encoding="utf-8")).get("stages") or {}
    except FileNotFoundError:
        return None
    except (OSError, YAMLError, AttributeError) as e:
        raise FiresightError(f"{dvc_yaml}: cannot read its stages: {e}") from None
    if stage not in stages:
        return None
    keys: set[str] = set()
    for entry in stages[stage].get("params") or []:
        if isinstance(entry, str):
            keys.add(entry)
        elif isinstance(entry, dict) and str(DEFAULT_PARAMS) in entry:  # `- params.yaml: [keys]` (other files: not ours)
            if entry[str(DEFAULT_PARAMS)] is None:
                return None  # DVC: every key of the file
            keys.update(entry[str(DEFAULT_PARAMS)])
    return frozenset(keys)


def restricted_params(params: Params, stage: str, dvc_yaml: Path = DVC_YAML) -> Params:
    """`params` as `stage` may read them (see `ParamsView`): typed as Params, which the view reads like."""
    declared = declared_params(stage, dvc_yaml)
    return params if declared is None else cast(Params, ParamsView(params, stage, declared | READ_BY_ANY_STAGE))


class ParamsView:
    """Read-only view of a params model (or one of its sections) through which only declared keys can be read.

    A declared section or key reads as the model's own value (a declared section is its pydantic model, whole); a
    section or model with only some keys declared reads as a nested view; anything else raises
    `UndeclaredParamsError`. `model_dump` reads every key, so it works where all of them are declared."""

    __slots__ = ("_model", "_stage", "_declared", "_prefix")

    def __init__(self, model: BaseModel, stage: str, declared: frozenset[str], prefix: str = "") -> None:
        for name, value in (("_model", model), ("_stage", stage), ("_declared", declared), ("_prefix", prefix)):
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in type(self._model).model_fields:
            raise AttributeError(f"{type(self._model).__name__} has no params key {name!r}")
        key = self._prefix + name
        value = getattr(self._model, name)
        if any(key == d or key.startswith(d + ".") for d in self._declared):
            return value
        if isinstance(value, BaseModel) and any(d.startswith(key + ".") for d in self._declared):
            return ParamsView(value, self._stage, self._declared, key + ".")
        raise UndeclaredParamsError(f"stage {self._stage} read params key {key}, which dvc.yaml does not declare "
                                    f"for it; add it to the stage's params in dvc.yaml")

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError("params are read-only")

    def __reduce__(self) -> tuple:
        return ParamsView, (self._model, self._stage, self._declared, self._prefix)

    def __repr__(self) -> str:
        return f"ParamsView({self._prefix.rstrip('.') or 'params'} of stage {self._stage})"

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """The model's `model_dump(**kwargs)`; raises `UndeclaredParamsError` unless every key of it is declared."""
        for name in type(self._model).model_fields:
            value = getattr(self, name)
            if isinstance(value, ParamsView):
                value.model_dump()
        return self._model.model_dump(**kwargs)
