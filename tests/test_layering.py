"""The library does not depend on its entry points: nothing in components/ imports pipelines/ (the stages, the
params schema and the CLI build on components, never the other way round)."""

import pytest

from tests.conftest import REPO
from tests.test_dvc_yaml import _imported_modules


@pytest.mark.parametrize("file", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "components").rglob("*.py")))
def test_components_never_import_pipelines(file):
    assert not {m for m in _imported_modules(REPO / file) if m.split(".")[0] == "pipelines"}, file
