"""dvc.yaml is true: each stage's code deps cover the repo files its module imports and name nothing else (so `dvc
repro` reruns a stage when its code changed, and not for others' code), and a stage reads only the params keys
dvc.yaml declares for it."""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
import yaml
from pydantic import BaseModel

from pipelines.params import ModelParams, Params, load_params
from pipelines.params_view import ParamsView, UndeclaredParamsError, declared_params, restricted_params
from tests.conftest import REPO

PACKAGES = ("components", "pipelines")  # the repo's own code; every other import is a library
STAGE_CMD = "sh pipelines/stage.sh "
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
# code a stage runs without importing it: the registered model's code, which MLflow runs as it logs the model
RUN_NOT_IMPORTED = {"evaluate": {"components/registry_model.py"}}


def _module_files(name: str) -> list[Path]:
    """The repo files that importing module `name` executes: each package's __init__.py on the way, then the module's
    own file (or its package's __init__.py); none for a module outside the repo's packages."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return []
    files = []
    for i in range(1, len(parts) + 1):
        path = REPO.joinpath(*parts[:i])
        found = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if not found.is_file():
            break  # `from pkg.mod import name`: `pkg.mod.name` is an attribute, not a module
        files.append(found)
    return files


def _imported_modules(file: Path) -> set[str]:
    """Every module an `import` in `file` names, at any depth (functions included); `from m import x` names m and
    m.x (x may be a submodule: _module_files drops it when it is not)."""
    package = ".".join(file.relative_to(REPO).with_suffix("").parts[:-1])  # what `from . import x` is relative to
    names = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def code_closure(module: str) -> set[str]:
    """Repo-relative paths of the files `python -m module` runs from the repo: its import closure."""
    todo, seen = _module_files(module), set()
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo += [f for name in _imported_modules(file) for f in _module_files(name)]
    return {f.relative_to(REPO).as_posix() for f in seen}


def _is_code(dep: str) -> bool:
    return dep.split("/")[0] in PACKAGES or dep.endswith(".py")


def _covers(dep: str, file: str) -> bool:
    return file == dep or file.startswith(dep.rstrip("/") + "/")


def _stage_modules() -> dict[str, str]:
    return {name: s["cmd"].removeprefix(STAGE_CMD) for name, s in STAGES.items() if s["cmd"].startswith(STAGE_CMD)}


def test_every_stage_runs_through_stage_sh():
    assert sorted(_stage_modules()) == sorted(STAGES)


@pytest.mark.parametrize("stage", sorted(_stage_modules()))
def test_a_stage_declares_exactly_the_code_it_runs(stage):
    closure = code_closure(f"pipelines.{_stage_modules()[stage]}") | {"pipelines/stage.sh"}
    closure |= RUN_NOT_IMPORTED.get(stage, set())
    deps = [d for d in STAGES[stage]["deps"] if _is_code(d)]
    missing = sorted(f for f in closure if not any(_covers(d, f) for d in deps))
    # over-declared: a file the stage never runs, a folder with none of it (a change there reruns it for nothing)
    unused = sorted(d for d in deps if not any(_covers(d, f) for f in closure))
    assert not missing and not unused, (f"dvc.yaml stage {stage}: code it runs but does not depend on: {missing}; "
                                        f"code deps it does not run: {unused}")


def test_the_closure_follows_imports_in_functions_and_submodules():
    assert {"components.models.net", "components.catalog.describe"} <= _imported_modules(
        REPO / "components/registry_model.py")  # both imported inside its methods only
    files = lambda *paths: [REPO / p for p in paths]
    assert _module_files("components.tracking") == files("components/__init__.py", "components/tracking.py")
    assert _module_files("components.models.net.load_net") == files(  # load_net: a function, not a module
        "components/__init__.py", "components/models/__init__.py", "components/models/net.py")
    assert _module_files("torch.nn") == []
    closure = code_closure("pipelines.index")
    assert {"pipelines/__init__.py", "pipelines/index.py", "pipelines/_runner.py", "pipelines/params.py",
            "components/__init__.py", "components/search/__init__.py", "components/search/index.py"} <= closure
    assert "pipelines/ablation.py" not in closure and "pipelines/tune.py" not in closure
    assert not any(f.startswith("tests/") for f in closure)


# --- the params a stage may read -------------------------------------------------------------------------------------

PARAMS = load_params(REPO / "params.yaml")


def params_dict(params: Params, *sections: str) -> dict:  # as pipelines/common.py's (not imported: it imports torch)
    return {s: getattr(params, s).model_dump(mode="json") for s in sections}


def _view(*declared: str) -> Params:
    return cast(Params, ParamsView(PARAMS, "index", frozenset(declared)))


def test_a_declared_section_reads_whole():
    view = _view("retrieval", "ray")
    assert view.retrieval is PARAMS.retrieval and view.retrieval.lr == PARAMS.retrieval.lr
    assert params_dict(view, "retrieval", "ray") == params_dict(PARAMS, "retrieval", "ray")


def test_a_declared_key_reads_and_its_siblings_raise():
    view = _view("model.image_size", "tune.asha.enabled")
    assert view.model.image_size == PARAMS.model.image_size
    assert view.tune.asha.enabled is PARAMS.tune.asha.enabled
    assert getattr(view.model, "head_lr_multiplier", 1.0) == 1.0  # not a key of the section: as on the model
    for read, key in ((lambda: view.model.backbone, "model.backbone"), (lambda: view.tune.search, "tune.search"),
                      (lambda: view.tune.asha.grace_period, "tune.asha.grace_period")):
        with pytest.raises(UndeclaredParamsError) as err:
            read()
        assert str(err.value) == (f"stage index read params key {key}, which dvc.yaml does not declare for it; "
                                  "add it to the stage's params in dvc.yaml")


def test_an_undeclared_section_raises_and_a_partial_one_cannot_be_dumped():
    view = _view("model.image_size")
    with pytest.raises(UndeclaredParamsError, match="stage index read params key tracking, "):
        view.tracking
    with pytest.raises(UndeclaredParamsError, match="params key model.backbone, "):
        view.model.model_dump(mode="json")
    assert _view(*(f"model.{k}" for k in ModelParams.model_fields)).model.model_dump(mode="json") == \
        PARAMS.model.model_dump(mode="json")


def test_the_view_is_read_only_and_pickles_with_its_restriction():
    view = _view("model.image_size")
    with pytest.raises(TypeError, match="read-only"):
        view.model.image_size = 1
    copy = pickle.loads(pickle.dumps(view))
    assert copy.model.image_size == PARAMS.model.image_size
    with pytest.raises(UndeclaredParamsError):
        copy.index


def test_declared_params_come_from_dvc_yaml(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text("stages:\n  index:\n    cmd: x\n    params: [model.image_size, index, {params.yaml: [ray]}]\n"
                        "  scan:\n    cmd: y\n")
    assert declared_params("index", dvc_yaml) == {"model.image_size", "index", "ray"}
    assert declared_params("scan", dvc_yaml) == frozenset()  # a stage with no params reads none
    assert declared_params("ablation", dvc_yaml) is None  # not a dvc stage: unrestricted
    assert declared_params("index", tmp_path / "missing.yaml") is None
    assert restricted_params(PARAMS, "ablation", dvc_yaml) is PARAMS
    with pytest.raises(UndeclaredParamsError):
        restricted_params(PARAMS, "scan", dvc_yaml).ingest
    assert restricted_params(PARAMS, "scan", dvc_yaml).tracking is PARAMS.tracking  # where runs go: any stage


def test_every_key_dvc_yaml_declares_is_a_params_key():
    for stage in STAGES:
        for key in declared_params(stage, REPO / "dvc.yaml") or ():
            model: object = PARAMS
            for part in key.split("."):
                assert isinstance(model, BaseModel) and part in type(model).model_fields, f"{stage}: {key}"
                model = getattr(model, part)


STAGE = """
from pipelines._runner import run_stage

def stage(params):
    print(params.model.image_size)
    params.index.batch_size

run_stage("index", stage)
"""


def test_the_runner_stops_a_stage_that_reads_an_undeclared_key(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text("stages:\n  index:\n    cmd: x\n    params: [model.image_size, index.dba_k]\n")
    done = subprocess.run([sys.executable, "-c", STAGE], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "FIRESIGHT_VERBOSE": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stdout.splitlines() == [str(PARAMS.model.image_size)]
    assert done.stderr.splitlines()[-1] == ("firesight index: error: stage index read params key index.batch_size, "
                                            "which dvc.yaml does not declare for it; add it to the stage's params in "
                                            "dvc.yaml")
