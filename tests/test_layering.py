"""The library does not depend on its entry points: nothing in components/ imports pipelines/ (the stages, the
params schema and the CLI build on components, never the other way round); and only the modules that are the Ray,
MLflow or DVC integration import those."""

import pytest

from tests.conftest import REPO
from tests.test_dvc_yaml import _imported_modules


@pytest.mark.parametrize("file", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "components").rglob("*.py")))
def test_components_never_import_pipelines(file):
    assert not {m for m in _imported_modules(REPO / file) if m.split(".")[0] == "pipelines"}, file


INTEGRATIONS = {  # the modules of components/ that are the integration with each engine
    "ray": {"components/app/ray_serve.py", "components/distributed.py", "components/search/ray_embed.py",
            "components/tuning.py"},
    "mlflow": {"components/catalog/model.py", "components/registry_model.py", "components/tracking.py",
               "components/tuning.py"},
    "dvc": set(),
}


@pytest.mark.parametrize("file", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "components").rglob("*.py")))
def test_only_the_integrations_import_ray_mlflow_or_dvc(file):
    engines = {m.split(".")[0] for m in _imported_modules(REPO / file)} & set(INTEGRATIONS)
    assert all(file in INTEGRATIONS[engine] for engine in engines), f"{file} imports {sorted(engines)}"
