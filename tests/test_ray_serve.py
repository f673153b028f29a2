"""The service as a Ray Serve deployment on a private local Ray: replicas build their Searcher from (index
location, model ref) and answer /search over HTTP on loopback."""

from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.test_http import TOKEN, build_catalog


@pytest.mark.slow
def test_serve_deployment_answers_a_search(ray_local, tmp_path):
    from ray import serve

    from components.app.ray_serve import deploy

    catalog = build_catalog(tmp_path, classes=2, per_class=5)
    port = free_port()
    try:
        deploy(catalog.location, catalog.checkpoint, port=port, token=TOKEN, num_replicas=1, num_cpus=1,
               app_options={"max_k": 20})
        url = f"http://127.0.0.1:{port}"
        query = catalog.images.iloc[6]
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/healthz").json() == {"status": "ok", "count": len(catalog.images)}
            assert http.post("/search", files={"image": ("q.jpg", b"x")}).status_code == 401
            answer = http.post("/search", headers={"Authorization": f"Bearer {TOKEN}"}, data={"k": "3"},
                               files={"image": ("q.jpg", Path(query.uri).read_bytes(), "image/jpeg")})
            assert answer.status_code == 200, answer.text
            hits = answer.json()["results"]
            assert (hits[0]["id"], hits[0]["label"]) == (query.id, query.label) and len(hits) == 3
            assert http.post("/search", headers={"X-API-Token": TOKEN}, data={"k": "21"},
                             files={"image": ("q.jpg", b"x")}).status_code == 422
            assert http.post("/index", headers={"X-API-Token": TOKEN}, data={"label": "x"},
                             files={"image": ("q.jpg", b"x")}).status_code == 403  # replicas are read-only
    finally:
        serve.shutdown()
