"""An override file run as a DVC experiment: the --set-param flags it becomes make DVC write exactly the merged
params (checked with the real dvc on a scratch repo), and a bad override file stops before DVC runs."""

import subprocess
import sys

import yaml

from pipelines.experiment import set_params
from pipelines.params import load_params, merge_overrides, read_overrides, read_yaml
from tests.conftest import REPO, dvc, git_commit_all

FULL = REPO / "configs" / "caltech101-full.yaml"
TRIPLET = {"retrieval": {"criterion": {"name": "batch_hard_triplet", "args": {"margin": 0.1}},
                         "sampler": {"name": "class_balanced", "args": {"classes_per_batch": 4, "images_per_class": 2, "batches_per_epoch": None}}},
           "tune": {"search": "off"}, "ingest": {"source": "it's/a path"}}


def test_dvc_applies_the_flags_as_the_merged_params(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"echo": {
        "cmd": "cp params.yaml seen.yaml", "params": ["ingest", "split", "classify", "tune", "retrieval", "evaluate",
                                                      "tracking"], "outs": ["seen.yaml"]}}}))
    git_commit_all(repo, "base")
    dvc(repo, "init", "-q")
    git_commit_all(repo, "dvc")
    base = read_yaml((REPO / "params.yaml").read_text())
    for overrides in (read_overrides(FULL), TRIPLET):
        flags = [arg for flag in set_params(overrides) for arg in ("--set-param", flag)]
        dvc(repo, "exp", "run", *flags)
        assert read_yaml((repo / "seen.yaml").read_text()) == merge_overrides(base, overrides)
        load_params(repo / "seen.yaml")
        subprocess.run(["git", "checkout", "-q", "params.yaml"], cwd=repo, check=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.experiment", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_the_command_names_the_experiment_after_the_file(tmp_path):
    done = _cli(str(FULL), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert " exp run -n caltech101-full --set-param ingest.source='../shared/datasets/caltech101'" in done.stdout


def test_a_bad_override_file_stops_before_dvc_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("retrieval: {epochs: 0}\nclassify: {lrr: 1}\n")
    done = _cli(str(bad))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "retrieval.epochs" in done.stderr and "classify.lrr: unknown key" in done.stderr
