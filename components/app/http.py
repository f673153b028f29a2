"""The search service: POST an image, get the most similar database images — a FastAPI app over a `Searcher`, with
thumbnails by id, token-guarded writes, bounded uploads and an HTML page at `/`.

Every refusal is one JSON line `{"detail": reason}` with a 4xx status; a bug's traceback goes to the server log and
the client gets a 500 line without it. Uploads are judged by decoding them (components.data.images), never by their
name or content type, and a client never names a server path: database images are reached by faiss id only.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import io
import ipaddress
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from components.catalog.model import load_model
from components.catalog.searcher import Searcher
from components.catalog.store import FAISS_ID, AddReport, CatalogError, SearchIndex, content_id
from components.data.contract import ID, LABEL, URI
from components.data.images import BadImage, decode_rgb, decode_side
from components.errors import DataError, FiresightError
from components.storage import StorageError, atomic_write_path, is_remote, read_bytes

log = logging.getLogger(__name__)

MiB = 2**20
THUMBNAIL_SIDE = 256
THUMBNAIL_CACHE_SIZE = 512  # thumbnails kept in memory (~20 KB each)
MAX_LABEL_CHARS = 200
MAX_FORM_FIELDS = 4  # text fields of a multipart request (k, exclude_same_file; label)
DECODE_SLOTS = 4  # uploads decoded at once: each may hold max_pixels × 3 bytes
PAGE = Path(__file__).with_name("page.html")
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
_TRUE, _FALSE = {"1", "true", "on", "yes"}, {"", "0", "false", "off", "no"}


class Base64Query(BaseModel):
    """POST /search as JSON: the image's bytes in base64 (never a URL or a path)."""

    model_config = ConfigDict(extra="forbid")
    image_base64: str
    k: int | None = None
    exclude_same_file: bool = False


class HitOut(BaseModel):
    rank: int
    score: float  # cosine similarity (1 = the same descriptor)
    id: str  # the database image's sha256
    faiss_id: int
    label: str
    thumbnail_url: str


class SearchAnswer(BaseModel):
    results: list[HitOut]
    model: dict[str, Any]
    took_ms: float  # on the server, from decoding the upload to the answer (waiting for the model included)


@dataclass(frozen=True)
class IndexWriter:
    """Enables POST /index: each new upload is kept as `<folder>/<sha256>.<ext>` (the uri its entry records; ext
    from the decoded format), described with the searcher's model and added. `folder` is outside the index: the
    index stage rebuilds its own folder, and uploaded images must outlive that."""

    folder: Path = Path("uploads")
    max_files: int = 16  # images per request

    def store(self, data: bytes) -> str:
        """Write `data` (an image that decoded) into the uploads folder, atomically; its uri."""
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
        ext = _EXTENSIONS.get(fmt) or re.sub(r"[^a-z0-9]", "", fmt.lower()) or "img"
        path = self.folder.resolve() / f"{content_id(data)}.{ext}"
        if not path.is_file():
            with atomic_write_path(path) as tmp:
                tmp.write_bytes(data)
        return str(path)


def load_searcher(index_location: str, model_ref: str, *, engine: str = "torch", tracking_uri: str | None = None,
                  rerank: bool = False) -> tuple[Searcher, dict[str, Any]]:
    """The Searcher of the index at `index_location` with the model `model_ref` names (refused unless it built the
    index), and the model_info to serve with it."""
    loaded = load_model(model_ref, engine=engine, tracking_uri=tracking_uri)
    searcher = Searcher(SearchIndex.open(index_location), loaded.describer, rerank)
    return searcher, {"name": loaded.source, "version": loaded.registry_version, "metrics": loaded.metrics}


def create_app(searcher: Searcher, *, model_info: dict[str, Any], token: str | None, writer: IndexWriter | None = None,
               max_upload_bytes: int = 20 * MiB, max_pixels: int = 40_000_000, default_k: int = 10,
               max_k: int = 100, model_slots: int = 1) -> FastAPI:
    """The service's app. model_info: name, version and metrics of the model, shown by GET /model. token: the API
    token (FIRESIGHT_API_TOKEN); when set, /search, /thumbnails and /model need it. writer: enables POST /index
    (None: writes are refused), which always needs the token. model_slots: searches run at once (1: one forward at
    a time on torch's threads; on a small CPU, one slot per core with torch.set_num_threads(1) serves more)."""
    token = token or None
    if writer is not None and token is None:
        raise FiresightError("writes (POST /index) need an API token: set FIRESIGHT_API_TOKEN, or serve read-only")
    if writer is not None and is_remote(searcher.index.location):
        raise FiresightError(f"{searcher.index.location}: writes over HTTP need a local index; add to an S3 index "
                             "with `firesight index add`, or serve read-only")
    if not 1 <= default_k <= max_k:
        raise FiresightError(f"default_k must be from 1 to max_k {max_k}, got {default_k}")
    if model_slots < 1:
        raise FiresightError(f"model_slots must be >= 1, got {model_slots}")
    service = _Service(searcher, writer, max_pixels, {k: v for k, v in model_info.items() if k != "metrics"},
                       model_slots)
    app = FastAPI(title="Firesight", summary="Fine-grained image retrieval: the most similar catalogue images.")
    app.state.token_required = token is not None
    app.add_middleware(_Guard, max_body=max_upload_bytes)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    reader = [Depends(_token_check(token))] if token else []
    page = PAGE.read_text(encoding="utf-8").replace("__CONFIG__", json.dumps(
        {"default_k": default_k, "max_k": max_k, "token_required": token is not None}))

    def checked_k(value: int | None) -> int:
        k = default_k if value is None else value
        if not 1 <= k <= max_k:
            raise HTTPException(422, f"k must be from 1 to {max_k}, got {k}")
        return k

    @app.post("/search", response_model=SearchAnswer, dependencies=reader, openapi_extra=_SEARCH_BODY)
    async def search(request: Request) -> dict[str, Any]:
        """The top-k database images most similar to the image sent (multipart field `image`, or JSON
        `image_base64`). exclude_same_file: leave out the database image with the same bytes."""
        if _media_type(request) == "application/json":
            try:
                query = Base64Query.model_validate_json(await request.body())
            except ValidationError as e:
                raise HTTPException(422, _explain(e.errors())) from None
            try:
                data = base64.b64decode(query.image_base64, validate=True)
            except binascii.Error:
                raise HTTPException(422, "image_base64: not valid base64") from None
            k, exclude = query.k, query.exclude_same_file
        else:
            async with _form(request, max_files=1) as form:
                data = await _upload(form.get("image"))
                k, exclude = _form_int(form.get("k")), _form_bool(form.get("exclude_same_file"))
        return await run_in_threadpool(service.search, data, checked_k(k), exclude)

    @app.get("/thumbnails/{faiss_id}", dependencies=reader, response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "no such entry"}})
    def thumbnail(faiss_id: Annotated[int, PathParam(ge=0, le=2**63 - 1)]) -> Response:
        """A JPEG thumbnail (longer side ≤ 256 px) of the database image with this faiss id."""
        return Response(service.thumbnail(faiss_id), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})

    def writes_enabled() -> None:
        if writer is None:
            raise HTTPException(403, "writes are disabled on this server (it serves the index read-only)")

    @app.post("/index", dependencies=[Depends(writes_enabled), Depends(_token_check(token))],
              openapi_extra=_INDEX_BODY)
    async def add(request: Request) -> dict[str, Any]:
        """Add images (multipart fields `image`, one or more, and `label`) to the index; needs the API token."""
        async with _form(request, max_files=writer.max_files) as form:
            uploads = [await _upload(f) for f in form.getlist("image")]
            label = form.get("label")
        if not uploads:
            raise HTTPException(422, "image: send one or more image files")
        if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL_CHARS or not label.isprintable():
            raise HTTPException(422, f"label: a class name of 1 to {MAX_LABEL_CHARS} printable characters is required")
        return await run_in_threadpool(service.add, uploads, label.strip())

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness: ok and the number of images searched (on the event loop: it never waits for a busy thread
        pool)."""
        return {"status": "ok", "count": len(service.searcher.index.entries)}

    @app.get("/model", dependencies=reader)
    def model() -> dict[str, Any]:
        """The model served (name, version, metrics) and the index it searches."""
        summary = {k: v for k, v in service.searcher.index.summary().items() if k != "location"}
        return {**model_info, "index": summary}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        return HTMLResponse(page.replace("__NONCE__", nonce), headers={
            "Content-Security-Policy": f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                                       "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; "
                                       "form-action 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    return app


def check_exposure(host: str, token_required: bool) -> None:
    """FiresightError unless `host` is loopback or the service requires a token."""
    if not token_required and not _is_loopback(host):
        raise FiresightError(f"refusing to serve on {host} without an API token (anyone who can reach it could "
                             "search and see the catalogue): set FIRESIGHT_API_TOKEN, or serve on 127.0.0.1")


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> None:
    """Run `app` with uvicorn until interrupted. Off loopback it needs `token`, and `app` created with it."""
    import uvicorn

    check_exposure(host, bool(token) and app.state.token_required)
    uvicorn.run(app, host=host, port=port, server_header=False)


class _Service:
    """The searcher serving now, and its model slots: up to `model_slots` searches at once, or one index write
    alone (it changes the faiss index in place)."""

    def __init__(self, searcher: Searcher, writer: IndexWriter | None, max_pixels: int, model_brief: dict[str, Any],
                 model_slots: int) -> None:
        self.searcher, self.writer, self.max_pixels, self.model_brief = searcher, writer, max_pixels, model_brief
        self.model_slots = model_slots
        self.slots = threading.BoundedSemaphore(model_slots)
        self.writing = threading.Lock()  # one writer gathers the slots at a time
        self.decoding = threading.BoundedSemaphore(DECODE_SLOTS)
        self.thumbnail = functools.lru_cache(maxsize=THUMBNAIL_CACHE_SIZE)(self._thumbnail)

    def decode(self, data: bytes, what: str = "image") -> Image.Image:
        try:
            with self.decoding:  # decoded as the index's images were: the model's meta says how
                return decode_rgb(data, self.max_pixels, draft_side=decode_side(self.searcher.describer.meta))
        except BadImage as e:
            raise HTTPException(422, f"{what}: {e.reason}") from None

    def search(self, data: bytes, k: int, exclude_same_file: bool) -> dict[str, Any]:
        start = time.perf_counter()
        image = self.decode(data)
        with self.slots:
            searcher = self.searcher
            hits = searcher.search([image], k, exclude=[content_id(data) if exclude_same_file else None])[0]
        results = [{"rank": h.rank, "score": h.score, "id": h.id, "faiss_id": h.faiss_id, "label": h.label,
                    "thumbnail_url": f"/thumbnails/{h.faiss_id}"} for h in hits]
        return {"results": results, "took_ms": round((time.perf_counter() - start) * 1000, 2),
                "model": {**self.model_brief, "index_generation": searcher.index.info["generation"]}}

    @contextmanager
    def alone(self) -> Iterator[None]:
        """Every model slot: no search runs while the index changes."""
        with self.writing:
            for _ in range(self.model_slots):
                self.slots.acquire()
            try:
                yield
            finally:
                for _ in range(self.model_slots):
                    self.slots.release()

    def _thumbnail(self, faiss_id: int) -> bytes:
        index = self.searcher.index
        row = int(index.rows_of(np.array([faiss_id]))[0])
        if row < 0:
            raise HTTPException(404, f"no image with faiss id {faiss_id} in the index")
        uri = index.entries[URI].iat[row]
        try:
            image = decode_rgb(read_bytes(uri), self.max_pixels, draft_side=THUMBNAIL_SIDE)
        except StorageError as e:
            log.warning("thumbnail %d: %s", faiss_id, e)
            raise HTTPException(503, "the image store is unavailable; try again later") from None
        except DataError as e:  # BadImage too
            log.warning("thumbnail %d (%s): %s", faiss_id, uri, e)
            raise HTTPException(404, f"the image of faiss id {faiss_id} is no longer readable") from None
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()

    def add(self, uploads: list[bytes], label: str) -> dict[str, Any]:
        images = [self.decode(data, f"image {i + 1}") for i, data in enumerate(uploads)]
        ids = [content_id(data) for data in uploads]
        with self.alone():
            index = self.searcher.index
            known = dict(zip(index.entries[ID], index.entries[FAISS_ID].astype(int)))
            fresh = [i for i, sha in enumerate(ids) if sha not in known and sha not in ids[:i]]
            if fresh:
                rows = pd.DataFrame({ID: [ids[i] for i in fresh], LABEL: label,
                                     URI: [self.writer.store(uploads[i]) for i in fresh]})
                descriptors = self.searcher.describer.describe([images[i] for i in fresh])
                try:
                    report = index.add(descriptors, rows, self.searcher.describer.meta)
                except Exception as e:  # serve what is on disk: the generation a refused or failed write left live
                    self.searcher = Searcher(SearchIndex.open(index.location), self.searcher.describer,
                                             self.searcher.rerank)
                    if isinstance(e, CatalogError):  # another writer made a newer generation
                        log.warning("POST /index: %s", e)
                        raise HTTPException(409, "the index changed on disk since this server read it; it now "
                                                 "serves the new generation: send the images again") from None
                    raise
            else:
                report = AddReport([], {})
            generation, count = index.info["generation"], len(index.entries)
        return {"added": [{"faiss_id": f, "id": ids[i], "label": label, "thumbnail_url": f"/thumbnails/{f}"}
                          for f, i in zip(report.added, fresh)],
                "already_indexed": [{"id": sha, "faiss_id": known[sha]} for sha in dict.fromkeys(ids) if sha in known],
                "count": count, "index_generation": generation}


class _Guard:
    """Outermost layer: refuses a body over `max_body` bytes — by its Content-Length before reading, and counted
    while it is read — and turns an uncaught exception into a logged traceback and a JSON 500 line."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.too_large = f"upload too large: the limit is {max_body / MiB:.1f} MiB per request"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _error(413, self.too_large)(scope, receive, send)
            return
        started, read = False, 0

        async def receiving() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_body:
                    raise HTTPException(413, self.too_large)
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receiving, sending)
        except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback reaches a client
            if isinstance(e, StarletteHTTPException):
                response = _error(e.status_code, str(e.detail))
            else:
                log.exception("%s %s failed", scope.get("method"), scope.get("path"))
                response = _error(500, "internal error: the server logged it")
            if not started:
                await response(scope, receive, send)


def _token_check(token: str | None):
    """A dependency: 401 unless the request carries `token` (Authorization: Bearer, or X-API-Token)."""
    expected = (token or "").encode()

    def check(request: Request) -> None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        presented = value.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-token", "")
        if not expected or not hmac.compare_digest(presented.encode(), expected):
            raise HTTPException(401, "a valid API token is required (Authorization: Bearer <token>, or X-API-Token)",
                                headers={"WWW-Authenticate": "Bearer"})

    return check


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": reason}, status_code=status, headers=headers)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(422, _explain(exc.errors()))


def _explain(errors: Any) -> str:
    """Pydantic's errors as one line: `field: message; ...` (never the input values)."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p not in ('body', 'path', 'query')) or 'body'}: "
                     f"{e['msg']}" for e in errors)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _form(request: Request, max_files: int):
    if _media_type(request) != "multipart/form-data":
        raise HTTPException(415, "send multipart/form-data with an `image` file, or JSON {\"image_base64\": ...}")
    return request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS)


async def _upload(field: UploadFile | str | None) -> bytes:
    if not isinstance(field, UploadFile):
        raise HTTPException(422, "image: a file upload is required (multipart field `image`)")
    return await field.read()


def _form_int(value: UploadFile | str | None) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,18}", value.strip()):
        return int(value)
    raise HTTPException(422, "k: must be an integer")


def _form_bool(value: UploadFile | str | None) -> bool:
    text = "" if value is None else value.strip().lower() if isinstance(value, str) else None
    if text not in _TRUE | _FALSE:
        raise HTTPException(422, "exclude_same_file: must be true or false")
    return text in _TRUE


_SEARCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary"}, "k": {"type": "integer"},
        "exclude_same_file": {"type": "boolean"}}}},
    "application/json": {"schema": Base64Query.model_json_schema()}}}}
_INDEX_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image", "label"], "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "label": {"type": "string"}}}}}}}
