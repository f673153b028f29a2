"""The README's first command, verbatim, from a clean copy of this checkout in a plain shell: no venv activated and
a `python` first on PATH that is not Firesight's (a stub that fails), on a tiny sample so that it fits in CI."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_PARAMS, git_commit_all, set_params, tiny_sample

pytestmark = pytest.mark.slow

STUB_MESSAGE = "stub python: not Firesight's interpreter"


def readme_commands() -> list[str]:
    """The README's opening fenced commands: set up + run the pipeline, then run the tests."""
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)[:2]]


def clean_copy(target: Path) -> None:
    """What a clone of this working tree holds: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
            os.chmod(target / name, source.stat().st_mode)


def plain_shell_env(stub_dir: Path) -> dict[str, str]:
    """This environment as a new user's shell has it: no venv on PATH or activated, no Firesight, MLflow or Ray
    settings, and a `python` first on PATH that fails."""
    venv_bin = Path(sys.executable).parent.resolve()
    path = [str(stub_dir)] + [p for p in os.environ["PATH"].split(os.pathsep) if p and Path(p).resolve() != venv_bin]
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith(("MLFLOW_", "RAY_", "FIRESIGHT_"))}
    return {**env, "PATH": os.pathsep.join(path)}


def test_readme_first_command_works_verbatim_in_a_clean_copy(tmp_path, capsys):
    setup_and_run, run_tests = readme_commands()
    assert setup_and_run == "./setup.sh && .venv/bin/dvc repro" and run_tests == ".venv/bin/python -m pytest"
    repo = tmp_path / "clone"
    clean_copy(repo)
    assert not (repo / ".venv").exists() and (repo / "setup.sh").is_file()
    for old in (repo / "data" / "sample").rglob("*"):
        if old.is_file():
            old.unlink()
    tiny_sample(repo / "data" / "sample", classes=12, per_class=8)
    set_params(repo, {**TINY_PARAMS, "tune": {"search": "off"}})
    git_commit_all(repo, "tiny sample")

    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "python").write_text(f"#!/bin/sh\necho \"{STUB_MESSAGE}\" >&2\nexit 1\n")
    (stub / "python").chmod(0o755)
    env = plain_shell_env(stub)
    which = subprocess.run(["bash", "-c", "command -v python"], env=env, capture_output=True, text=True).stdout.strip()
    assert which == str(stub / "python"), f"python resolves to {which}"

    start = time.monotonic()
    done = subprocess.run(["bash", "-c", setup_and_run], cwd=repo, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=2400)
    seconds, printed = time.monotonic() - start, len((done.stdout + done.stderr).encode())
    with capsys.disabled():
        print(f"\nREADME first command on the tiny sample: {seconds:.0f} s, printed {printed / 1024:.1f} KiB")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert STUB_MESSAGE not in output
    for stage in ("scan", "ingest", "split", "classify", "tune", "retrieval", "postprocess", "index", "evaluate"):
        assert f"Running stage '{stage}'" in output
    assert (repo / "metrics.json").is_file() and (repo / ".venv" / "bin" / "dvc").is_file()
