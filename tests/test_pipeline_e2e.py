"""`dvc repro` of the whole pipeline on a tiny real sample, in a fresh git repo: outputs, registry, caching."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import NEG_MARGIN, POS_MARGIN, margin_space, tiny_sample

pytestmark = pytest.mark.slow

TINY = {
    "ingest": {"source": "data/sample", "min_side": 16},
    "model": {"image_size": 64, "frozen_stages": 5},
    "classify": {"epochs": 1, "batch_size": 16, "train_max_side": [56, 72]},
    "tune": {**margin_space(pos=[0.5], neg=[1.0, 1.2]), "epochs_per_trial": 1,
             "asha": {"enabled": False, "grace_period": 1, "reduction_factor": 2}},
    "retrieval": {"epochs": 1, "batch_size": 8, "train_max_side": [64, 64],  # DeepFirearm's pairs on the cached trunk
                  "criterion": {"name": "double_margin_contrastive",
                                "args": {"pos_margin": 0.7, "neg_margin": 1.2, "squared": True}},
                  "miner": None,
                  "sampler": {"name": "random_pairs", "args": {"pos_per_class": 2, "neg_per_class": 2, "redraw_every": 5}}},
    "postprocess": {"image_sizes": [80], "scale_sets": [[1.0], [1.0, 0.75]],
                    "whitening": {"kinds": ["center", "pca", "learned"], "dims": [32], "shrinkages": [0.5]},
                    "dba": {"k": [0, 2], "alpha": [3.0]}, "qe": {"k": [0, 2], "alpha": [3.0]},
                    "k_reciprocal": {"k1": [6], "k2": [2], "lambda_value": [0.3]}},
}


def _dvc(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    done = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout + done.stderr


def _set_params(repo: Path, changes: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_dvc_repro_end_to_end(repo_copy: Path, capsys):
    repo = repo_copy
    first_class = tiny_sample(repo / "data" / "sample", classes=12, per_class=8)[0][1]
    (repo / "data" / "sample" / first_class / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _set_params(repo, TINY)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny"], cwd=repo, check=True)

    start = time.monotonic()
    log = _dvc(repo, "repro")
    with capsys.disabled():  # against test_pipeline_s3's, in the test log
        print(f"\ndvc repro, embedded defaults: {time.monotonic() - start:.1f} s")
    for stage in ("scan", "ingest", "split", "classify", "tune", "retrieval", "postprocess", "index", "evaluate"):
        assert f"Running stage '{stage}'" in log
        assert re.search(rf"^firesight {stage}: done in [0-9.]+ s.* \(log: logs/{stage}\.log\)$", log, re.M), log
    # what the terminal shows: each epoch's bar and one line per stage (21 KB before, mostly Ray's and MLflow's)
    assert len(log.encode()) < 8000, log
    for chatter in ("Reporting training result", "Checkpoint successfully created", "Token authentication",
                    "View the dashboard", "View run", "MLflow database tables", "alembic", "Trial status"):
        assert chatter not in log
    assert re.search(r"^classify epoch 1: 100%.*loss=.*val_map=", log, re.M) and "tune trials: 100%" in log
    for stage in ("classify", "tune", "retrieval"):  # ... and what the stage's log keeps
        assert "Reporting training result" in (repo / "logs" / f"{stage}.log").read_text()
    assert "MLflow database tables" in (repo / "logs" / "classify.log").read_text()

    report = json.loads((repo / "data/ingest_report.json").read_text())
    assert [q["file"].endswith(f"{first_class}/broken.jpg") for q in report["quarantine"]] == [True]
    splits = pd.read_parquet(repo / "data/splits.parquet")
    test_db = splits[(splits["split"] == "test") & (splits["role"] == "db")]
    from components.catalog.store import SearchIndex
    index = SearchIndex.open(repo / "index")
    ids = index.entries
    assert sorted(ids["id"]) == sorted(test_db["id"])
    search_meta = json.loads((repo / "models/search/meta.json").read_text())  # the postprocess stage's choice
    assert search_meta["image_size"] in (64, 80) and search_meta["scales"] in ([1.0], [1.0, 0.75])
    assert index.descriptors.shape == (len(ids), search_meta["dim"]) and index.faiss_index.ntotal == len(ids)
    indexed = json.loads((repo / "metrics/index.json").read_text())  # embedded on Ray Data actors, nothing left out
    assert (indexed["engine"], indexed["images"], indexed["undescribed"]) == ("ray", len(ids), [])
    for model in ("search", "off_the_shelf"):
        choice = json.loads((repo / "models" / model / "choice.json").read_text())
        assert choice["val_map_chosen"] >= choice["val_map_start"] == choice["trials"][0]["val_map"]
        assert {t["step"] for t in choice["trials"]} == {"resolution", "whitening", "dba", "qe", "k-reciprocal"}

    metrics = json.loads((repo / "metrics.json").read_text())
    queries = int((splits["split"].eq("test") & splits["role"].eq("query")).sum())
    systems = [metrics["test"], *metrics["baselines"].values()]
    assert set(metrics["baselines"]) == {"off-the-shelf", "off-the-shelf + free wins", "fine-tuned"}
    for summary in systems:
        for protocol in ("firearm", "leave_one_out"):
            figures = summary[protocol]
            assert 0 < figures["map"]["value"] <= 1 and figures["map"]["lo"] <= figures["map"]["value"] <= figures["map"]["hi"]
            assert 0 <= figures["cmc@1"]["value"] <= figures["cmc@5"]["value"] <= 1
        assert summary["firearm"]["queries"] == queries and summary["firearm"]["database"] == len(ids)
        assert summary["leave_one_out"]["queries"] == queries + len(ids)
    gain = metrics["gains"]["over the best training-free"]["leave_one_out"]["map"]
    assert gain["diff"] == pytest.approx(metrics["test"]["leave_one_out"]["map"]["value"]
                                         - metrics["baselines"]["off-the-shelf + free wins"]["leave_one_out"]["map"]["value"], abs=1e-5)
    assert gain["lo"] <= gain["diff"] <= gain["hi"]
    assert (repo / "plots/distances.png").read_bytes()[:4] == b"\x89PNG"
    gallery = (repo / "reports/gallery.html").read_text()  # every test query, worst first, with its top-10
    assert gallery.count('<section class="query"') == queries and "src=\"http" not in gallery
    assert json.loads((repo / "models/retrieval/history.json").read_text())[0]["epoch"] == 0

    trials = pd.read_csv(repo / "tune/trials.csv")  # the margin search: 2 grid trials, the best one used
    assert sorted(zip(trials[POS_MARGIN], trials[NEG_MARGIN])) == [(0.5, 1.0), (0.5, 1.2)]
    assert set(trials["status"]) == {"finished"} and trials["best_val_map"].between(0, 1).all()
    chosen = json.loads((repo / "tune/best_params.json").read_text())
    assert chosen["val_map"] == pytest.approx(trials["best_val_map"].max())
    meta = json.loads((repo / "models/retrieval/meta.json").read_text())
    assert (meta["criterion"]["args"]["pos_margin"], meta["criterion"]["args"]["neg_margin"]) == \
        (chosen["overrides"][POS_MARGIN], chosen["overrides"][NEG_MARGIN])
    assert (repo / "plots/search.png").read_bytes()[:4] == b"\x89PNG"
    search_seconds = json.loads((repo / "metrics/tune.json").read_text())["search_wall_seconds"]

    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("firesight-retriever", "champion")
    assert str(champion.version) == "1"
    assert champion.tags["backbone"] == "tf_efficientnet_lite0" and champion.tags["pooling"] == "gem"
    assert float(champion.tags["test_loo_map"]) == pytest.approx(metrics["test"]["leave_one_out"]["map"]["value"], abs=1e-6)
    assert len(champion.tags["data_manifest_sha256"]) == 64 and champion.tags["git_commit"] != "unknown"
    runs = client.search_runs([client.get_experiment_by_name("firesight").experiment_id])
    assert {r.data.tags["firesight.stage"] for r in runs} == {"classify", "tune", "tune-trial", "retrieval", "evaluate"}
    tune_run = next(r for r in runs if r.data.tags["firesight.stage"] == "tune")
    assert tune_run.data.metrics[f"best_{NEG_MARGIN}"] == pytest.approx(chosen["overrides"][NEG_MARGIN])
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune_run.info.run_id]) == 2

    assert champion.tags["weights_sha256"] == index.model["weights_sha256"]  # the index knows its registered model
    query = test_db["uri"].iloc[0]  # the README's search: the champion from the registry, the index from index/
    found = subprocess.run([str(Path(sys.executable).with_name("firesight")), "search", query, "-k", "3", "--json"],
                           cwd=repo, capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["queries"][0]["results"][0]["id"] == test_db["id"].iloc[0]  # itself, by content

    rerun = _dvc(repo, "repro")  # with nothing changed, only the scan runs (it always looks at the source)
    assert re.findall(r"Running stage '(\w+)'", rerun) == ["scan"], "a second repro must rerun nothing but the scan"

    _set_params(repo, {"retrieval": {"criterion": {"name": "double_margin_contrastive",  # only the search-off default:
                                                "args": {"pos_margin": 0.6, "neg_margin": 1.2, "squared": True}}}})  # search restored
    log = _dvc(repo, "repro")
    assert "Running stage 'tune'" in log and "restoring search" in (repo / "logs" / "tune.log").read_text()
    assert json.loads((repo / "tune/best_params.json").read_text()) == chosen
    restored = json.loads((repo / "metrics/tune.json").read_text())  # the search's time adds up over invocations
    assert restored["search_wall_seconds"] == pytest.approx(search_seconds + restored["wall_seconds"], abs=0.11)
    assert "Running stage 'retrieval'" in log and "Running stage 'evaluate'" in log
    for stage in ("ingest", "split", "classify"):
        assert f"Running stage '{stage}'" not in log
    versions = client.search_model_versions("name='firesight-retriever'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("firesight-retriever", "champion")  # moves only when beaten: a tie keeps it
    assert float(champion.tags["test_loo_map"]) == max(float(v.tags["test_loo_map"]) for v in versions)
    assert "alias 'champion'" in (repo / "logs" / "evaluate.log").read_text()
