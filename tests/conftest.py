import shutil
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


def tiny_sample(target: Path, classes: int, per_class: int, max_side: int = 64) -> list[tuple[str, str]]:
    """Copy `classes` × `per_class` real images of the committed sample, shrunk to `max_side`; return (path, label)."""
    rows = []
    names = sorted(d.name for d in SAMPLE.iterdir() if d.is_dir() and d.name != "BACKGROUND_Google")[:classes]
    for name in names:
        (target / name).mkdir(parents=True, exist_ok=True)
        for f in sorted((SAMPLE / name).iterdir())[:per_class]:
            with Image.open(f) as im:
                im = im.convert("RGB")
                im.thumbnail((max_side, max_side))
                im.save(target / name / f.name, format="JPEG")
            rows.append((str(target / name / f.name), name))
    return rows


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the session's distributed tests, shut down at the end."""
    from components.distributed import ensure_ray  # before ray itself: it keeps a local Ray on loopback
    import ray

    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A copy of the pipeline code and config (not data or outputs) in a fresh git repo."""
    dst = tmp_path / "repo"
    for item in ("components", "pipelines", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore"):
        src = REPO / item
        (dst / item).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst / item)
    return dst
