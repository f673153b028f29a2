"""`firesight` on the committed sample: search (tables and --json), index info/add/remove, a model from the MLflow
registry, refusal to mix models, and bad input as one line."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from components.catalog import indexing
from components.models.net import RetrievalNet, save_checkpoint
from components.search.index import IndexSpec
from tests.conftest import SAMPLE

CLASSES = sorted(d.name for d in SAMPLE.iterdir() if d.is_dir())[:4]
runner = CliRunner()


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory) -> tuple[Path, Path, pd.DataFrame]:
    """An index of 4 sample classes (15 images each; the other 5 per class are left to add), and its checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    net = RetrievalNet.create("tf_efficientnet_lite0", "gem", image_size=96, weights="imagenet").eval()
    save_checkpoint(root / "best.pt", net)
    found = indexing.candidates(str(SAMPLE), "folder").images
    found = found[found["label"].isin(CLASSES)]
    indexed = found.groupby("label").head(15).reset_index(drop=True)
    indexing.build(str(root / "index"), net, indexed, IndexSpec(), batch_size=16)
    return root, root / "best.pt", found


def _invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _fresh_copy(sample_index, tmp_path) -> Path:
    root, _, _ = sample_index
    shutil.copytree(root / "index", tmp_path / "index")
    return tmp_path / "index"


def test_a_database_image_finds_itself_first_and_json_schema(sample_index):
    root, ckpt, found = sample_index
    query = found["uri"].iloc[3]
    code, out, err = _invoke("search", query, "-k", "5", "--model", str(ckpt), "--index", str(root / "index"), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"index", "model", "k", "queries"} and doc["k"] == 5
    (answer,) = doc["queries"]
    assert answer["query"] == query and len(answer["results"]) == 5
    first = answer["results"][0]
    assert set(first) == {"rank", "score", "faiss_id", "id", "label", "uri"}
    assert first["uri"] == query and first["rank"] == 1 and first["score"] == pytest.approx(1.0, abs=1e-4)
    scores = [r["score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True)
    code, out, _ = _invoke("search", query, "-k", "5", "--model", str(ckpt), "--index", str(root / "index"), "--json",
                           "--exclude-same-file")
    assert all(r["uri"] != query for r in json.loads(out)["queries"][0]["results"])


def test_a_folder_query_and_a_bad_file_are_each_answered(sample_index, tmp_path):
    root, ckpt, _ = sample_index
    folder = tmp_path / "queries"
    folder.mkdir()
    files = sorted((SAMPLE / CLASSES[1]).iterdir())
    shutil.copy(files[0], folder / "indexed.jpg")  # a copy of an indexed image, under another name
    shutil.copy(files[16], folder / "unseen.jpg")  # not in the index
    (folder / "notes.jpg").write_text("not an image")
    code, out, err = _invoke("search", str(folder), "-k", "3", "--model", str(ckpt), "--index", str(root / "index"),
                             "--json")
    assert code == 2  # some queries failed: said, not hidden
    answers = {Path(a["query"]).name: a for a in json.loads(out)["queries"]}
    assert len(answers) == 3 and "not an image" in answers["notes.jpg"]["error"]
    assert answers["indexed.jpg"]["results"][0]["uri"] == str(files[0])  # found by content, not by name
    assert answers["indexed.jpg"]["results"][0]["label"] == CLASSES[1]
    assert [r["rank"] for r in answers["unseen.jpg"]["results"]] == [1, 2, 3]
    code, out, _ = _invoke("search", str(folder / "indexed.jpg"), "-k", "2", "--model", str(ckpt),
                           "--index", str(root / "index"))
    assert code == 0 and "rank" in out and CLASSES[1] in out  # the table


def test_index_add_remove_round_trip(sample_index, tmp_path):
    _, ckpt, found = sample_index
    index = _fresh_copy(sample_index, tmp_path)
    new = tmp_path / "new" / CLASSES[2]
    new.mkdir(parents=True)
    unseen = found[found["label"] == CLASSES[2]]["uri"].iloc[15:17].tolist()
    for u in unseen:
        shutil.copy(u, new / Path(u).name)
    (new / "broken.jpg").write_bytes(Path(unseen[0]).read_bytes()[:300])  # truncated
    code, out, err = _invoke("index", "add", str(tmp_path / "new"), "--model", str(ckpt), "--index", str(index))
    assert code == 2 and "added 2 image(s)" in out and "broken.jpg" in err and "truncated" in err
    code, out, _ = _invoke("search", str(new / Path(unseen[0]).name), "-k", "1", "--model", str(ckpt), "--index",
                           str(index), "--json")
    hit = json.loads(out)["queries"][0]["results"][0]
    assert hit["uri"] == str(new / Path(unseen[0]).name) and hit["faiss_id"] == 60  # ids continue after 0-59
    code, out, _ = _invoke("index", "info", "--index", str(index), "--json")
    assert json.loads(out)["count"] == 62
    code, out, _ = _invoke("index", "remove", "60", "--index", str(index))
    assert code == 0 and "removed 1 image(s)" in out
    code, out, _ = _invoke("search", str(new / Path(unseen[0]).name), "-k", "62", "--model", str(ckpt), "--index",
                           str(index), "--json")
    assert 60 not in [r["faiss_id"] for r in json.loads(out)["queries"][0]["results"]]
    code, _, err = _invoke("index", "remove", "60", "--index", str(index))
    assert code == 2  # already gone: said


def test_index_add_on_ray_data_actors_adds_what_the_in_process_add_does(sample_index, tmp_path, ray_local):
    from components.catalog.store import SearchIndex

    _, ckpt, found = sample_index
    new = tmp_path / "new" / CLASSES[3]
    new.mkdir(parents=True)
    for u in found[found["label"] == CLASSES[3]]["uri"].iloc[15:20]:
        shutil.copy(u, new / Path(u).name)
    grown = {}
    for how, extra in (("local", []), ("ray", ["--actors", "2"])):
        index = _fresh_copy(sample_index, tmp_path / how)
        code, out, err = _invoke("index", "add", str(tmp_path / "new"), "--model", str(ckpt), "--index", str(index), *extra)
        assert code == 0 and "added 5 image(s)" in out, err
        grown[how] = SearchIndex.open(index)
    assert grown["ray"].entries["uri"].tolist() == grown["local"].entries["uri"].tolist()
    assert abs(grown["ray"].descriptors - grown["local"].descriptors).max() <= 1e-5


def test_another_model_is_refused_before_any_work(sample_index, tmp_path):
    index = _fresh_copy(sample_index, tmp_path)
    other = RetrievalNet.create("tf_efficientnet_lite0", "gem", image_size=128, weights="imagenet")  # another space
    save_checkpoint(tmp_path / "other.pt", other)
    code, _, err = _invoke("index", "add", str(SAMPLE / CLASSES[0]), "--label-from", "folder", "--model",
                           str(tmp_path / "other.pt"), "--index", str(index))
    assert code == 1 and "descriptor spaces must not mix" in err and "Traceback" not in err
    code, _, err = _invoke("search", str(SAMPLE / CLASSES[0]), "--model", str(tmp_path / "other.pt"), "--index", str(index))
    assert code == 1 and "descriptor spaces must not mix" in err


def test_missing_things_are_one_line(sample_index, tmp_path, monkeypatch):
    root, ckpt, found = sample_index
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")  # a registry without the model
    query = found["uri"].iloc[0]
    code, _, err = _invoke("search", query, "--model", str(ckpt), "--index", str(tmp_path / "none"))
    assert code == 1 and "no index here" in err and "dvc repro" in err and len(err.strip().splitlines()) == 1
    code, _, err = _invoke("search", query, "--index", str(root / "index"), "--params", str(tmp_path / "none.yaml"))
    assert code == 1 and "not in the MLflow registry" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_registry_champion_is_the_default_model(sample_index, tmp_path, monkeypatch):
    """Register the checkpoint as evaluate does, then search with no --model: the champion is used, and `index
    info` names its registry version. Runs the installed `firesight` script (the README's command)."""
    import mlflow
    import numpy as np

    from components import tracking
    from components.catalog.describe import DIGEST_KEY, model_digest
    from components.models.net import load_net

    root, ckpt, found = sample_index
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.configure(uri, "cli-test")
    with mlflow.start_run():
        tracking.register_model(checkpoint=ckpt, example_image=np.zeros((8, 8, 3), np.uint8), name="firesight-retriever",
                                alias="champion", metric="test_loo_map", value=0.5,
                                tags={DIGEST_KEY: model_digest(load_net(ckpt))})
    env = dict(os.environ)
    script = Path(sys.executable).with_name("firesight")
    query = found["uri"].iloc[20]
    out = subprocess.run([str(script), "search", query, "-k", "1", "--index", str(root / "index"), "--json"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr  # library chatter goes to logs/firesight.log
    assert json.loads(out.stdout)["queries"][0]["results"][0]["uri"] == query
    info = subprocess.run([str(script), "index", "info", "--index", str(root / "index")], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert info.returncode == 0 and "firesight-retriever/1" in info.stdout, info.stderr
    exported = subprocess.run([str(script), "export", "onnx", "--index", str(root / "index"), "--output",
                               str(tmp_path / "model.onnx")], capture_output=True, text=True, env=env, timeout=300,
                              cwd=tmp_path)
    assert exported.returncode == 0 and "attached to models:/firesight-retriever/1" in exported.stdout, exported.stderr
    by_onnx = subprocess.run([str(script), "search", query, "-k", "1", "--engine", "onnx", "--index", str(root / "index"),
                              "--json"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert by_onnx.returncode == 0, by_onnx.stderr  # the registry's ONNX artifact, downloaded
    assert json.loads(by_onnx.stdout)["queries"][0]["results"][0]["uri"] == query


def test_onnx_export_then_search_without_torch(sample_index, tmp_path):
    """`export onnx` checks parity on the index's images; `search --engine onnx` answers as torch does, and the
    process never imports torch."""
    root, ckpt, found = sample_index
    onnx_path = tmp_path / "model.onnx"
    code, out, err = _invoke("export", "onnx", "--model", str(ckpt), "--output", str(onnx_path), "--index",
                             str(root / "index"), "--params", str(tmp_path / "none.yaml"))
    assert code == 0, err
    assert re.search(r"max \|Δ\| vs torch \d\.\d\de-\d\d on 8 images", out)
    assert float(re.search(r"vs torch (\S+)", out).group(1)) <= 1e-4
    queries = found["uri"].iloc[[1, 17, 33]].tolist()
    code, out, _ = _invoke("search", *queries, "-k", "5", "--model", str(ckpt), "--index", str(root / "index"), "--json")
    by_torch = json.loads(out)["queries"]
    program = ("import json, sys\n"
               "from pipelines.cli import app\n"
               "try:\n"
               f"    app({['search', *queries, '-k', '5', '--engine', 'onnx', '--model', str(onnx_path), '--index', str(root / 'index'), '--json']!r})\n"
               "except SystemExit as e:\n"
               "    assert e.code in (0, None), e.code\n"
               "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and done.stderr.strip().endswith("NO-TORCH"), done.stderr
    by_onnx = json.loads(done.stdout)["queries"]
    for t, o in zip(by_torch, by_onnx):
        assert [r["faiss_id"] for r in o["results"]] == [r["faiss_id"] for r in t["results"]]
        assert [r["score"] for r in o["results"]] == pytest.approx([r["score"] for r in t["results"]], abs=1e-4)


def test_serve_wires_the_service_and_refuses_exposure_without_a_token(sample_index, tmp_path):
    import httpx

    from tests.conftest import free_port, stop_group

    root, ckpt, found = sample_index
    script = str(Path(sys.executable).with_name("firesight"))
    env = {k: v for k, v in os.environ.items() if k != "FIRESIGHT_API_TOKEN"}
    exposed = subprocess.run([script, "serve", "--host", "0.0.0.0", "--model", str(ckpt), "--index",
                              str(root / "index")], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert exposed.returncode == 1 and "without an API token" in exposed.stderr and "Traceback" not in exposed.stderr
    index = _fresh_copy(sample_index, tmp_path)
    port = free_port()
    server = subprocess.Popen([script, "serve", "--port", str(port), "--model", str(ckpt), "--index", str(index),
                               "--uploads", str(tmp_path / "uploads")], env={**env, "FIRESIGHT_API_TOKEN": "s3cret"},
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        auth = {"Authorization": "Bearer s3cret"}
        query = Path(found["uri"].iloc[5]).read_bytes()
        hits = httpx.post(f"{url}/search", files={"image": ("q.jpg", query)}, data={"k": "3"}, headers=auth).json()
        assert hits["results"][0]["id"] == found["id"].iloc[5] and len(hits["results"]) == 3
        unseen = found[found["label"] == CLASSES[3]].iloc[18]
        added = httpx.post(f"{url}/index", files={"image": ("new.jpg", Path(unseen["uri"]).read_bytes())},
                           data={"label": CLASSES[3]}, headers=auth)
        assert added.status_code == 200, added.text
        assert (tmp_path / "uploads" / f"{unseen['id']}.jpg").is_file()  # kept outside the index folder
        again = httpx.post(f"{url}/search", files={"image": ("q.jpg", Path(unseen["uri"]).read_bytes())},
                           data={"k": "1"}, headers=auth).json()
        assert again["results"][0]["id"] == unseen["id"]
    finally:
        stop_group(server)


def test_queries_are_decoded_as_the_index_images_were(tmp_path):
    """A draft-decode model (the sample's 224-px JPEGs described at 96 px: decoded at 1/2 scale): a database image
    searched for scores 1.0 with itself — the query was draft-decoded too; a full decode of it would not."""
    from components.catalog.describe import TorchDescriber
    from components.data.images import DRAFT_DECODE, load_rgb
    from components.search.embed import embed_images

    net = RetrievalNet.create("tf_efficientnet_lite0", "gem", image_size=96, weights="imagenet").eval()
    net.meta = {**net.meta, DRAFT_DECODE: True}
    save_checkpoint(tmp_path / "best.pt", net)
    images = indexing.candidates(str(SAMPLE), "folder").images.groupby("label").head(2).head(8).reset_index(drop=True)
    indexing.build(str(tmp_path / "index"), net, images, IndexSpec(), batch_size=8)
    query = images["uri"].iloc[5]
    code, out, err = _invoke("search", query, "-k", "1", "--model", str(tmp_path / "best.pt"), "--index",
                             str(tmp_path / "index"), "--json")
    assert code == 0, err
    (hit,) = json.loads(out)["queries"][0]["results"]
    assert hit["uri"] == query and hit["score"] == pytest.approx(1.0, abs=1e-5)
    indexed = embed_images(net, [query])[1][0]
    fully_decoded = TorchDescriber(net).describe([load_rgb(query)])[0]
    assert float(indexed @ fully_decoded) < 1 - 1e-4
