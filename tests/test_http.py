"""The HTTP search service against a real small index (3 sample classes, ImageNet lite0 at 96 px): search by upload
and by base64, thumbnails by id only, the limits (never a 500), the token rules and writes."""

import base64
import io
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from components.data.images import DRAFT_DECODE
from components.app.http import IndexWriter, check_exposure, create_app, load_searcher, serve
from components.catalog import indexing
from components.catalog.store import SearchIndex, content_id
from components.errors import FiresightError
from components.models.net import RetrievalNet, save_checkpoint
from components.search.index import IndexSpec
from tests.conftest import SAMPLE

TOKEN = "test-token-0123456789"
MODEL_INFO = {"name": "lite0-imagenet", "version": "test/1", "metrics": {"mAP": 0.5}}
HIT_KEYS = {"rank", "score", "id", "faiss_id", "label", "thumbnail_url"}


@dataclass(frozen=True)
class Catalog:
    location: str  # the index
    checkpoint: str  # the model that built it
    images: pd.DataFrame  # id, label, uri of the indexed images
    spare: pd.DataFrame  # images of one more class, not indexed


def build_catalog(folder: Path, classes: int = 3, per_class: int = 8, draft_decode: bool = False) -> Catalog:
    """An index of `per_class` committed sample images of each of the first `classes` classes, with ImageNet lite0
    at 96 px saved as a checkpoint beside it (`draft_decode`: a model that decodes the 224-px JPEGs at 1/2 scale)."""
    net = RetrievalNet.create("tf_efficientnet_lite0", "gem", image_size=96, weights="imagenet").eval()
    net.meta = {**net.meta, **({DRAFT_DECODE: True} if draft_decode else {})}
    save_checkpoint(folder / "model.pt", net)
    rows = [{"id": content_id(f.read_bytes()), "label": d.name, "uri": str(f)}
            for d in sorted(p for p in SAMPLE.iterdir() if p.is_dir())[:classes + 1]
            for f in sorted(d.glob("*.jpg"))[:per_class]]
    found = pd.DataFrame(rows)
    indexed = found[found.label != found.label.iloc[-1]].reset_index(drop=True)
    indexing.build(str(folder / "index"), net, indexed, IndexSpec(), 16)
    return Catalog(str(folder / "index"), str(folder / "model.pt"), indexed,
                   found[found.label == found.label.iloc[-1]].reset_index(drop=True))


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Catalog:
    return build_catalog(tmp_path_factory.mktemp("catalog"))


def client(location: str, checkpoint: str, **options) -> TestClient:
    """A TestClient of a fresh app over the index at `location` (opened anew: writes of one test stay there)."""
    searcher, _ = load_searcher(location, checkpoint)
    return TestClient(create_app(searcher, model_info=MODEL_INFO, **{"token": None, **options}))


@pytest.fixture(scope="module")
def api(catalog) -> TestClient:
    return client(catalog.location, catalog.checkpoint)


def upload(data: bytes, name: str = "query.jpg", **fields) -> dict:
    return {"files": {"image": (name, data, "image/jpeg")}, "data": {k: str(v) for k, v in fields.items()}}


def refused(response, status: int, *words: str) -> str:
    """Assert a JSON error line with `status` whose reason holds `words`; the reason."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "Traceback" not in detail
    assert all(w in detail for w in words), detail
    return detail


def test_search_by_upload_and_base64_finds_the_image_itself(api, catalog):
    row = catalog.images.iloc[5]
    data = Path(row.uri).read_bytes()
    by_upload = api.post("/search", **upload(data, k=4))
    by_json = api.post("/search", json={"image_base64": base64.b64encode(data).decode(), "k": 4})
    for answer in (by_upload, by_json):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert set(body) == {"results", "model", "took_ms"}
        assert body["model"] == {"name": "lite0-imagenet", "version": "test/1", "index_generation": "g000001"}
        assert isinstance(body["took_ms"], float) and body["took_ms"] > 0
        hits = body["results"]
        assert [h["rank"] for h in hits] == [1, 2, 3, 4]
        assert all(set(h) == HIT_KEYS for h in hits)
        assert all(h["thumbnail_url"] == f"/thumbnails/{h['faiss_id']}" for h in hits)
        assert (hits[0]["id"], hits[0]["label"]) == (row.id, row.label)
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert str(SAMPLE) not in answer.text and catalog.location not in answer.text  # no server paths
    assert by_upload.json()["results"] == by_json.json()["results"]


def test_exclude_same_file_leaves_the_query_out(api, catalog):
    row = catalog.images.iloc[2]
    data = Path(row.uri).read_bytes()
    for request in (upload(data, k=3, exclude_same_file="true"),
                    {"json": {"image_base64": base64.b64encode(data).decode(), "k": 3, "exclude_same_file": True}}):
        hits = api.post("/search", **request).json()["results"]
        assert len(hits) == 3 and row.id not in {h["id"] for h in hits}
        assert hits[0]["score"] < 0.999


def test_thumbnails_by_id_only(api, catalog):
    hit = api.post("/search", **upload(Path(catalog.images.uri.iloc[0]).read_bytes(), k=1)).json()["results"][0]
    thumb = api.get(hit["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as im:
        assert im.format == "JPEG" and max(im.size) <= 256
    assert api.get(hit["thumbnail_url"]).content == thumb.content  # from the cache
    refused(api.get("/thumbnails/99999"), 404, "99999")
    for probe in ("/thumbnails/..%2F..%2F..%2Fetc%2Fpasswd", "/thumbnails/../../etc/passwd", "/thumbnails/-1",
                  f"/thumbnails/{catalog.images.uri.iloc[0]}", "/thumbnails/1e3", f"/thumbnails/{2**70}"):
        answer = api.get(probe)
        assert answer.status_code in (404, 422), (probe, answer.status_code)
        assert b"root:" not in answer.content and not answer.headers["content-type"].startswith("image/")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("bad")
    for side in (10000, 20000):  # 100 and 400 MP of zeros in small files
        Image.new("1", (side, side)).save(folder / f"{side}.png", optimize=True)
    good = (SAMPLE / "Barn_Swallow" / "0000.jpg").read_bytes()
    return {"bomb.png": (folder / "20000.png").read_bytes(), "large.png": (folder / "10000.png").read_bytes(),
            "truncated.jpg": good[:len(good) // 2],
            "text.jpg": b"this is not an image, whatever its name says\n", "empty.jpg": b""}


@pytest.mark.parametrize("name, words", [("bomb.png", ["decompression bomb"]),
                                         ("large.png", ["too many pixels", "10000x10000", "40.0 MP"]),
                                         ("truncated.jpg", ["truncated"]), ("text.jpg", ["not an image"]),
                                         ("empty.jpg", ["not an image"])])
def test_bad_uploads_are_refused_with_the_reason(api, bad_files, name, words):
    assert len(bad_files[name]) < 2**20
    refused(api.post("/search", **upload(bad_files[name], name=name)), 422, *words)
    encoded = {"image_base64": base64.b64encode(bad_files[name]).decode()}
    refused(api.post("/search", json=encoded), 422, *words)


def test_request_limits(api, catalog):
    data = Path(catalog.images.uri.iloc[0]).read_bytes()
    small = client(catalog.location, catalog.checkpoint, max_upload_bytes=len(data) // 2)
    refused(small.post("/search", **upload(data)), 413, "too large")  # by its Content-Length

    def chunks():  # no Content-Length: counted while read
        yield b'{"image_base64": "'
        for _ in range(64):
            yield b"A" * 4096
        yield b'"}'

    refused(small.post("/search", content=chunks(), headers={"content-type": "application/json"}), 413, "too large")
    for k in (0, -1, 10**6):
        refused(api.post("/search", **upload(data, k=k)), 422, "k must be from 1 to 100")
        refused(api.post("/search", json={"image_base64": base64.b64encode(data).decode(), "k": k}), 422, "k must")
    refused(api.post("/search", **upload(data, k="ten")), 422, "k")
    refused(api.post("/search", **upload(data, exclude_same_file="maybe")), 422, "exclude_same_file")
    refused(api.post("/search", json={"image_url": "http://example.com/x.jpg"}), 422, "image_url", "image_base64")
    refused(api.post("/search", json={"image_base64": "not base64!"}), 422, "base64")
    refused(api.post("/search", content=b"{", headers={"content-type": "application/json"}), 422, "JSON")
    refused(api.post("/search", files={"image": (None, "/etc/passwd")}), 422, "file upload")  # a path is no file
    refused(api.post("/search", data={"image": "/etc/passwd"}), 415, "multipart")
    refused(api.post("/search", content=data, headers={"content-type": "image/jpeg"}), 415, "multipart")


def test_a_bug_is_a_logged_500_line_without_its_traceback(catalog, caplog):
    searcher, _ = load_searcher(catalog.location, catalog.checkpoint)
    searcher.describer.describe = lambda images: 1 / 0
    api = TestClient(create_app(searcher, model_info=MODEL_INFO, token=None))
    with caplog.at_level(logging.ERROR, logger="components.app.http"):
        answer = api.post("/search", **upload(Path(catalog.images.uri.iloc[0]).read_bytes()))
    assert refused(answer, 500, "internal error") and "ZeroDivision" not in answer.text
    assert "ZeroDivisionError" in caplog.text


def test_health_model_page_and_docs(api, catalog):
    assert api.get("/healthz").json() == {"status": "ok", "count": len(catalog.images)}
    model = api.get("/model").json()
    assert {k: model[k] for k in MODEL_INFO} == MODEL_INFO
    assert model["index"]["count"] == len(catalog.images) and model["index"]["classes"] == 3
    assert "location" not in model["index"] and catalog.location not in str(model)
    page = api.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text and 'id="results"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert api.get("/docs").status_code == 200
    assert {"/search", "/thumbnails/{faiss_id}", "/index", "/healthz", "/model"} <= set(
        api.get("/openapi.json").json()["paths"])


def test_token_rules_and_writes(catalog, tmp_path):
    location = str(tmp_path / "index")
    shutil.copytree(catalog.location, location)
    api = client(location, catalog.checkpoint, token=TOKEN, writer=IndexWriter(tmp_path / "uploads"))
    new = catalog.spare.iloc[0]
    data = Path(new.uri).read_bytes()
    form = {"files": [("image", ("new.jpg", data, "image/jpeg"))], "data": {"label": "New_Bird"}}

    refused(api.post("/index", **form), 401, "token")
    refused(api.post("/index", headers={"Authorization": "Bearer wrong"}, **form), 401, "token")
    refused(api.post("/index", headers={"X-API-Token": TOKEN[:-1]}, **form), 401, "token")
    for path in ("/model", "/thumbnails/0"):
        refused(api.get(path), 401, "token")
    refused(api.post("/search", **upload(data)), 401, "token")
    assert api.get("/healthz").status_code == 200 and api.get("/").status_code == 200
    assert '"token_required": true' in api.get("/").text

    added = api.post("/index", headers={"X-API-Token": TOKEN}, **form)
    assert added.status_code == 200, added.text
    body = added.json()
    assert [a["id"] for a in body["added"]] == [new.id] and body["count"] == len(catalog.images) + 1
    assert (tmp_path / "uploads" / f"{new.id}.jpg").read_bytes() == data
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    top = api.post("/search", headers=bearer, **upload(data, k=2)).json()["results"][0]
    assert (top["id"], top["label"], top["faiss_id"]) == (new.id, "New_Bird", body["added"][0]["faiss_id"])
    assert top["score"] == pytest.approx(1.0, abs=1e-4)
    assert api.get(top["thumbnail_url"], headers=bearer).status_code == 200

    again = api.post("/index", headers=bearer, **form).json()
    assert again["added"] == [] and again["already_indexed"] == [{"id": new.id, "faiss_id": top["faiss_id"]}]

    SearchIndex.open(location).remove([top["faiss_id"]])  # another writer: the server's generation is stale
    other = catalog.spare.iloc[1]
    form = {"files": [("image", ("other.jpg", Path(other.uri).read_bytes(), "image/jpeg"))], "data": {"label": "B"}}
    refused(api.post("/index", headers=bearer, **form), 409, "changed on disk")
    assert api.get("/healthz").json()["count"] == len(catalog.images)  # it serves the new generation
    assert api.post("/index", headers=bearer, **form).json()["added"][0]["id"] == other.id
    refused(api.post("/index", headers=bearer, files=form["files"], data={"label": " "}), 422, "label")
    refused(api.post("/index", headers=bearer, files=[("image", ("x.jpg", b"nope", "image/jpeg"))],
                     data={"label": "x"}), 422, "image 1", "not an image")

    read_only = client(location, catalog.checkpoint, token=TOKEN)
    refused(read_only.post("/index", headers=bearer, **form), 403, "disabled")


def test_writes_need_a_token_and_serving_off_loopback_needs_one(catalog, tmp_path):
    searcher, _ = load_searcher(catalog.location, catalog.checkpoint)
    with pytest.raises(FiresightError, match="need an API token"):
        create_app(searcher, model_info=MODEL_INFO, token=None, writer=IndexWriter(tmp_path / "uploads"))
    for app, token in ((create_app(searcher, model_info=MODEL_INFO, token=None), None),
                       (create_app(searcher, model_info=MODEL_INFO, token=None), TOKEN)):  # the app lacks it
        with pytest.raises(FiresightError, match="refusing to serve on 0.0.0.0 without an API token"):
            serve(app, host="0.0.0.0", token=token)
    for host in ("127.0.0.1", "::1", "localhost", "[::1]"):
        check_exposure(host, token_required=False)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        with pytest.raises(FiresightError):
            check_exposure(host, token_required=False)
        check_exposure(host, token_required=True)


def test_concurrent_searches_and_a_write_with_two_model_slots(catalog, tmp_path):
    location = str(tmp_path / "index")
    shutil.copytree(catalog.location, location)
    api = client(location, catalog.checkpoint, token=TOKEN, writer=IndexWriter(tmp_path / "uploads"), model_slots=2)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    new = catalog.spare.iloc[2]

    def search(row) -> str:
        return api.post("/search", headers=bearer, **upload(Path(row.uri).read_bytes(), k=1)).json()["results"][0]["id"]

    def add() -> int:
        return api.post("/index", headers=bearer, files=[("image", ("n.jpg", Path(new.uri).read_bytes()))],
                        data={"label": "New"}).status_code

    rows = [catalog.images.iloc[i % len(catalog.images)] for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        found = [pool.submit(search, row) for row in rows[:8]]
        added = pool.submit(add)
        found += [pool.submit(search, row) for row in rows[8:]]
        assert [f.result() for f in found] == [row.id for row in rows] and added.result() == 200
    assert search(new) == new.id


def test_an_upload_is_decoded_as_the_index_images_were(tmp_path):
    """With a draft-decode model a database image uploaded scores 1.0 with itself: the upload was decoded at the
    reduced scale its indexed copy was."""
    catalog = build_catalog(tmp_path, classes=2, per_class=4, draft_decode=True)
    data = Path(catalog.images.uri.iloc[2]).read_bytes()
    hit = client(catalog.location, catalog.checkpoint).post("/search", **upload(data, k=1)).json()["results"][0]
    assert hit["id"] == catalog.images.id.iloc[2] and hit["score"] == pytest.approx(1.0, abs=1e-5)
