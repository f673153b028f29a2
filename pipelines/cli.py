"""`firesight`: search with a registered model, grow or shrink its index, serve it over HTTP, export it to ONNX.

Defaults come from params.yaml in the working directory (the registry name and alias, the tracking URI, the serve
section); every one can be given on the command line. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from components.errors import FiresightError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-grained image search with a Firesight model.")
index_app = typer.Typer(no_args_is_help=True, help="Inspect, grow and shrink an index.")
export_app = typer.Typer(no_args_is_help=True, help="Export the model.")
app.add_typer(index_app, name="index")
app.add_typer(export_app, name="export")

DEFAULT_INDEX = "index"
QUERY_BATCH = 32  # query images described per forward pass
CHECK_IMAGES = 8  # database images the ONNX export is checked on

ModelOpt = Annotated[str | None, typer.Option("--model", help="models:/<name>@<alias>, models:/<name>/<version>, a "
                                              "checkpoint (.pt), or an .onnx file; default: the registry's champion")]
IndexOpt = Annotated[str, typer.Option("--index", help="folder or s3:// prefix holding an index")]
ParamsOpt = Annotated[Path, typer.Option("--params", help="params file with the registry and serve settings")]


def _settings(params: Path) -> dict:
    """The params this CLI uses (validated), or the shipped defaults when there is no params file here."""
    if not params.is_file():
        return {"model": "models:/firesight-retriever@champion", "tracking_uri": "sqlite:///mlflow.db",
                "batch_size": 4}
    from pipelines.params import load_params

    p = load_params(params)
    return {"model": f"models:/{p.evaluate.registered_model}@{p.evaluate.champion_alias}",
            "tracking_uri": p.tracking.uri, "batch_size": p.index.batch_size}


def _quiet_libraries() -> None:
    """Library chatter (MLflow, alembic, faiss loader) off the terminal: warnings only, to logs/firesight.log."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    handler: logging.Handler
    try:
        Path("logs").mkdir(exist_ok=True)
        handler = logging.FileHandler("logs/firesight.log")
    except OSError:
        handler = logging.NullHandler()
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    for name in ("mlflow", "alembic"):  # they install their own terminal handlers
        library = logging.getLogger(name)
        library.handlers, library.propagate = [], True
        library.setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _load(model: str | None, settings: dict, engine: str = "torch"):
    from components.catalog.model import load_model

    return load_model(model or settings["model"], engine=engine, tracking_uri=settings["tracking_uri"])


def _checked(make, index: str, settings: dict):
    """make(), with the registry version that built the index at `index` named when its model is refused."""
    from components.catalog.model import registry_version_of
    from components.catalog.store import ModelMismatch, SearchIndex

    try:
        return make()
    except ModelMismatch as e:
        name = settings["model"].removeprefix("models:/").split("@")[0].split("/")[0]
        built = registry_version_of(SearchIndex.open(index).model["weights_sha256"], name, settings["tracking_uri"])
        raise ModelMismatch(f"{e}" + (f" (this index's model is models:/{built}: pass --model models:/{built})"
                                      if built else "")) from None


def _query_files(queries: list[str]) -> Iterator[str]:
    """Each query path; a folder stands for every file under it (sorted, hidden files skipped)."""
    for q in queries:
        path = Path(q)
        if path.is_dir():
            yield from (str(p) for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith("."))
        else:
            yield q


@app.command()
def search(
    queries: Annotated[list[str], typer.Argument(help="image files or folders of images")],
    k: Annotated[int, typer.Option("-k", min=1, max=10_000, help="results per query")] = 10,
    model: ModelOpt = None,
    index: IndexOpt = DEFAULT_INDEX,
    engine: Annotated[str, typer.Option(help="torch, or onnx (onnxruntime, no torch)")] = "torch",
    rerank: Annotated[bool, typer.Option(help="the query-side re-ranking chosen on val (αQE or k-reciprocal)")] = False,
    exclude_same_file: Annotated[bool, typer.Option(help="a query that is in the database does not return itself")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document instead of tables")] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """The top-k database images for each query: rank, score, label, id, path."""
    _quiet_libraries()
    from components.catalog.searcher import Searcher
    from components.catalog.store import SearchIndex, content_id
    from components.data.images import BadImage, decode_rgb, decode_side
    from components.storage import read_bytes

    try:
        settings = _settings(params)
        opened = SearchIndex.open(index)
        searcher = _checked(lambda: Searcher(opened, _load(model, settings, engine).describer, rerank=rerank),
                            index, settings)
        side = decode_side(searcher.describer.meta)  # queries decoded as the index's images were
        files = list(_query_files(queries))
        answers: list[dict] = []
        for start in range(0, len(files), QUERY_BATCH):
            good, images, sha = [], [], []
            for f in files[start:start + QUERY_BATCH]:
                try:
                    data = read_bytes(f)
                    images.append(decode_rgb(data, draft_side=side))
                except (BadImage, FiresightError) as e:
                    answers.append({"query": f, "error": getattr(e, "reason", str(e))})
                    continue
                good.append(f)
                sha.append(content_id(data))
            hits = searcher.search(images, k, exclude=sha if exclude_same_file else None) if images else []
            answers += [{"query": f, "id": s, "results": [h.as_dict() for h in hs]} for f, s, hs in zip(good, sha, hits)]
    except FiresightError as e:
        _fail(str(e))
    order = {f: i for i, f in reversed(list(enumerate(files)))}  # each file's first position
    answers.sort(key=lambda a: order[a["query"]])
    if as_json:
        typer.echo(json.dumps({"index": index, "model": searcher.describer.meta.get("weights_sha256"), "k": k,
                               "queries": answers}, indent=2))
    else:
        _print_answers(answers)
    if any("error" in a for a in answers):
        raise typer.Exit(2)


def _print_answers(answers: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for a in answers:
        if "error" in a:
            console.print(f"[red]{a['query']}: {a['error']}[/red]")
            continue
        table = Table(title=a["query"], title_justify="left")
        for column in ("rank", "score", "label", "id"):
            table.add_column(column, justify="left" if column == "label" else "right", no_wrap=True)
        table.add_column("path", overflow="fold")
        for h in a["results"]:
            table.add_row(str(h["rank"]), f"{h['score']:.4f}", h["label"], str(h["faiss_id"]), h["uri"])
        console.print(table)


@index_app.command("info")
def index_info(index: IndexOpt = DEFAULT_INDEX,
               as_json: Annotated[bool, typer.Option("--json")] = False,
               params: ParamsOpt = Path("params.yaml")) -> None:
    """Model version, count, kind, dimension, built-at."""
    _quiet_libraries()
    from components.catalog.model import registry_version_of
    from components.catalog.store import SearchIndex

    try:
        settings = _settings(params)
        summary = SearchIndex.open(index).summary()
        name = settings["model"].removeprefix("models:/").split("@")[0].split("/")[0]
        summary["model"]["registry_version"] = (summary["model"]["registry_version"] or
                                                registry_version_of(summary["model"]["weights_sha256"], name,
                                                                    settings["tracking_uri"]))
    except FiresightError as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    m = summary["model"]
    for key, value in (("index", summary["location"]), ("generation", summary["generation"]),
                       ("images", f"{summary['count']} in {summary['classes']} classes"), ("kind", summary["kind"]),
                       ("dimension", summary["dim"]),
                       ("model", f"{m['registry_version'] or 'not registered'} (weights {m['weights_sha256'][:12]}, "
                                 f"{m['arch']}, {m['image_size']} px, scales {m['scales']})"),
                       ("built at", summary["built_at"]), ("updated at", summary["updated_at"])):
        typer.echo(f"{key:>11}: {value}")


@index_app.command("add")
def index_add(
    source: Annotated[str, typer.Argument(help="a folder of class folders, or a CSV path,label")],
    label_from: Annotated[str, typer.Option(help="folder (class = sub-folder name) or csv")] = "folder",
    model: ModelOpt = None,
    index: IndexOpt = DEFAULT_INDEX,
    actors: Annotated[int, typer.Option(min=0, max=1024, help="embed on this many Ray Data actors (a private local "
                                        "Ray, or RAY_ADDRESS's cluster); 0: in this process")] = 0,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Embed new images with the index's model and add them (no rebuild; ids stay stable)."""
    _quiet_libraries()
    from components.catalog import indexing
    from components.catalog.store import SearchIndex

    if label_from not in ("folder", "csv"):
        _fail(f"--label-from must be folder or csv, got {label_from!r}")
    try:
        settings = _settings(params)
        target = SearchIndex.open(index)
        found = indexing.candidates(source, label_from)
        describer = _load(model, settings).describer
        _checked(lambda: target.check_model(describer.meta), index, settings)  # before any embedding
        describe = indexing.describe_in_process
        if actors:
            from components.distributed import ensure_ray
            from components.search.ray_embed import ray_describer

            ensure_ray(forward_logs=False)  # Ray's own lines (its servers', its actors') stay off the terminal
            describe = ray_describer(actors=actors)
        report = indexing.add(target, describer.net, found.images, settings["batch_size"], describe)
    except FiresightError as e:
        _fail(str(e))
    rejected = found.rejected + report.undescribed
    for r in rejected:
        typer.echo(f"rejected {r['file']}: {r['reason']}", err=True)
    typer.echo(f"added {len(report.added)} image(s) to {index} (ids {_ranges(report.added)}); "
               f"{len(report.already_indexed)} already indexed, {len(rejected)} rejected")
    if rejected:
        raise typer.Exit(2)


def _ranges(ids: list[int]) -> str:
    if not ids:
        return "none"
    return f"{ids[0]}–{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else ", ".join(map(str, ids))


@index_app.command("remove")
def index_remove(ids: Annotated[list[int], typer.Argument(help="faiss ids, as search prints them")],
                 index: IndexOpt = DEFAULT_INDEX) -> None:
    """Remove images by id."""
    _quiet_libraries()
    from components.catalog.store import SearchIndex

    try:
        gone = SearchIndex.open(index).remove(ids)
    except FiresightError as e:
        _fail(str(e))
    unknown = sorted(set(ids) - set(gone))
    typer.echo(f"removed {len(gone)} image(s) from {index}" + (f"; not in it: {unknown}" if unknown else ""))
    if unknown:
        raise typer.Exit(2)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="bind address; one other than loopback needs FIRESIGHT_API_TOKEN")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    model: ModelOpt = None,
    index: IndexOpt = DEFAULT_INDEX,
    engine: Annotated[str, typer.Option(help="torch, or onnx (onnxruntime, no torch)")] = "torch",
    rerank: Annotated[bool, typer.Option()] = False,
    model_slots: Annotated[int, typer.Option(min=0, max=64, help="searches at once, one thread each (0: the "
                                                                  "cores, up to 4; bench/load_test.py)")] = 0,
    uploads: Annotated[Path | None, typer.Option(help="enable POST /index (always behind the token), keeping the "
                                                      "uploaded images in this folder")] = None,
    max_upload_mb: Annotated[float, typer.Option(min=0.01, max=1024, help="largest upload accepted")] = 20.0,
    max_megapixels: Annotated[float, typer.Option(min=0.01, max=1000, help="largest image accepted")] = 40.0,
    replicas: Annotated[int, typer.Option(min=0, max=1000, help="run as a Ray Serve deployment of this many "
                                                                "read-only replicas (RAY_ADDRESS: on that cluster)")] = 0,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """The HTTP search service and its page (FastAPI on uvicorn, or Ray Serve replicas): open http://HOST:PORT/."""
    _quiet_libraries()
    from components.app.http import IndexWriter, create_app, load_searcher, serve as run

    slots = model_slots or min(4, os.cpu_count() or 1)
    limits = {"max_upload_bytes": int(max_upload_mb * 2**20), "max_pixels": int(max_megapixels * 1e6)}
    try:
        settings = _settings(params)
        token = os.environ.get("FIRESIGHT_API_TOKEN") or None
        if replicas:
            if uploads:
                raise FiresightError("--uploads: Ray Serve replicas serve read-only (a write would reach one replica)")
            _serve_on_ray(index, model or settings["model"], engine, host, port, token, replicas, limits)
            return
        searcher, info = _checked(lambda: load_searcher(index, model or settings["model"], engine=engine,
                                                        tracking_uri=settings["tracking_uri"], rerank=rerank),
                                  index, settings)
        if engine == "torch" and slots > 1:  # one forward per core beats one forward on all (bench/load_test.py)
            import torch

            torch.set_num_threads(1)
        application = create_app(searcher, model_info=info, token=token, model_slots=slots,
                                 writer=IndexWriter(uploads) if uploads else None, **limits)
        typer.echo(f"serving {index} ({len(searcher.index.entries)} images, model {info['version'] or info['name']}) "
                   f"on http://{host}:{port}/ — {slots} model slot(s)" + ("; writes on" if uploads else ""), err=True)
        run(application, host=host, port=port, token=token)
    except FiresightError as e:
        _fail(str(e))


def _serve_on_ray(index: str, model: str, engine: str, host: str, port: int, token: str | None, replicas: int,
                  limits: dict) -> None:
    """Deploy the app on Ray Serve (the cluster RAY_ADDRESS names, else a private local Ray) until Ctrl-C."""
    import time

    from ray import serve

    from components.app.ray_serve import deploy
    from components.distributed import ensure_ray

    ensure_ray()
    deploy(index, model, host=host, port=port, token=token, num_replicas=replicas, app_options=limits)
    typer.echo(f"serving {index} with {replicas} Ray Serve replica(s) on http://{host}:{port}/ (Ctrl-C stops)", err=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


@export_app.command("onnx")
def export_onnx_command(
    model: ModelOpt = None,
    output: Annotated[Path, typer.Option(help="where to write the ONNX model")] = Path("models/search/model.onnx"),
    index: Annotated[str, typer.Option("--index", help="the index whose images the export is checked on")] = DEFAULT_INDEX,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Write the descriptor network as ONNX, check it against torch with onnxruntime on real images, and attach it
    to the registry version it came from."""
    _quiet_libraries()
    from components.catalog.store import SearchIndex
    from components.data.images import load_rgb
    from components.export.onnx import check_parity, export_onnx

    try:
        settings = _settings(params)
        loaded = _load(model, settings)
        net = loaded.describer.net
        net.meta = loaded.describer.meta  # the ONNX file carries the weights digest: indexes accept it as this model
        images = [load_rgb(u) for u in SearchIndex.open(index).entries["uri"].head(CHECK_IMAGES)]
        export_onnx(net, output)
        delta = check_parity(net, output, images)
        where = _attach_onnx(loaded.registry_version, output, settings) if loaded.registry_version else None
    except FiresightError as e:
        _fail(str(e))
    typer.echo(f"wrote {output}: max |Δ| vs torch {delta:.2e} on {len(images)} images"
               + (f"; attached to models:/{loaded.registry_version} as {where}" if where else ""))


def _attach_onnx(registry_version: str, path: Path, settings: dict) -> str:
    """Log the ONNX file to the version's run and tag the version with its URI (what `--engine onnx` downloads)."""
    from mlflow import MlflowClient

    from components.catalog.model import ONNX_TAG, use_tracking

    use_tracking(settings["tracking_uri"])
    name, version = registry_version.split("/")
    client = MlflowClient()
    run_id = client.get_model_version(name, version).run_id
    client.log_artifact(run_id, str(path), "onnx")
    uri = f"runs:/{run_id}/onnx/{path.name}"
    client.set_model_version_tag(name, version, ONNX_TAG, uri)
    return uri


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
