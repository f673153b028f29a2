"""The search service as a Ray Serve application: the same FastAPI app (components.app.http) in every replica, each
building its own Searcher from the index location and the model reference — only those strings travel, never an
index or a network.

Replicas serve read-only (POST /index answers 403): a write would change one replica's index and not the others'.
Grow the index with `firesight index add`, then redeploy.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from components.app.http import check_exposure, create_app, load_searcher

APP_NAME = "firesight"


@serve.deployment
@serve.ingress()
class SearchService:
    """One replica: the index and model loaded in its own process, behind the service's app."""

    def __init__(self, index_location: str, model_ref: str, token: str | None, engine: str = "torch",
                 model_info: dict[str, Any] | None = None, app_options: dict[str, int] | None = None) -> None:
        searcher, info = load_searcher(index_location, model_ref, engine=engine)
        self._app = create_app(searcher, model_info=model_info or info, token=token, **(app_options or {}))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app


def application(index_location: str, model_ref: str, *, token: str | None = None, num_replicas: int = 1,
                num_cpus: float = 1.0, engine: str = "torch", model_info: dict[str, Any] | None = None,
                app_options: dict[str, int] | None = None) -> Application:
    """The deployment bound to its arguments, `num_replicas` replicas of `num_cpus` each. app_options: create_app's
    keyword options (max_upload_bytes, max_pixels, default_k, max_k, model_slots)."""
    return SearchService.options(num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus}).bind(
        index_location, model_ref, token, engine, model_info, app_options)


def deploy(index_location: str, model_ref: str, *, host: str = "127.0.0.1", port: int = 8000,
           token: str | None = None, **options: Any) -> DeploymentHandle:
    """Start Serve's HTTP proxy on host:port (refused off loopback without a token) on the Ray this process is
    connected to, and run the application there at `/`; returns once its replicas are up. Stop it with
    `serve.shutdown()`."""
    check_exposure(host, token_required=bool(token))
    serve.start(http_options={"host": host, "port": port})
    return serve.run(application(index_location, model_ref, token=token, **options), name=APP_NAME, route_prefix="/")
