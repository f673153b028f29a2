"""Batch embedding on Ray Data — the Ray integration of `components.search.embed`: image URIs (local or s3://)
stream through a pool of actors that each hold the network once, and descriptors stream back to the caller in
blocks, so neither the images nor (with `on_block`) all descriptors are ever held in one process. Each actor runs
`embed_images` itself, so a descriptor is the one the single-process path gives; an unreadable image is a per-image
error in the answer, not a lost job; a dead actor is restarted and its batch retried."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import ray
from tqdm import tqdm

from components.distributed import ensure_ray
from components.errors import DataError, FiresightError
from components.models.net import RetrievalNet, net_from_checkpoint
from components.search.embed import embed_images

log = logging.getLogger(__name__)
INDEX, URI, DESCRIPTOR, ERROR = "index", "uri", "descriptor", "error"


@dataclass
class RayEmbedding:
    """Row i of `descriptors` is image `indices[i]` of the input; `errors` maps the index of every image that could
    not be described to why."""

    indices: np.ndarray
    descriptors: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)


class _Describer:
    """A Ray Data actor: the network built once, then `embed_images` over each batch of URIs."""

    def __init__(self, model: dict | ray.ObjectRef, batch_size: int, use_gpu: bool) -> None:
        import torch

        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        self.device = "cuda" if use_gpu else "cpu"
        self.net = net_from_checkpoint(model).to(self.device)
        self.batch_size = batch_size
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        uris = [str(u) for u in batch[URI]]
        try:
            _, x = embed_images(self.net, uris, batch_size=self.batch_size, device=self.device)
            errors = [""] * len(uris)
        except DataError:  # find which: one image at a time
            rows, errors = [], []
            for uri in uris:
                try:
                    rows.append(embed_images(self.net, [uri], batch_size=1, device=self.device)[1][0])
                    errors.append("")
                except DataError as e:
                    rows.append(np.full(self.net.meta["dim"], np.nan, dtype=np.float32))
                    errors.append(str(e))
            x = np.stack(rows)
        return {INDEX: np.asarray(batch[INDEX], dtype=np.int64), DESCRIPTOR: x.astype(np.float32),
                ERROR: np.asarray(errors, dtype=object)}


def _log_through_ours() -> None:
    """Ray Data prints its execution plan and progress lines to the console itself: send them through the process's
    own logging instead (a stage's go to its log file), keeping Ray's session file."""
    data_log = logging.getLogger("ray.data")
    for handler in data_log.handlers[:]:
        if isinstance(handler, logging.StreamHandler):  # the console's (Ray's session file handler is not one)
            data_log.removeHandler(handler)
    data_log.propagate = True


def embed_with_ray(net: RetrievalNet, uris: Sequence[str], *, batch_size: int = 32, actors: int = 2,
                   cpus_per_actor: float = 1, use_gpu: bool = False,
                   on_block: Callable[[np.ndarray, np.ndarray], None] | None = None, progress: bool = False,
                   desc: str = "embed") -> RayEmbedding:
    """Describe `uris` with `net` (its meta: resolution, scales, crops, whitening) on `actors` Ray Data actors.

    `on_block(indices, descriptors)` is called with each block as it arrives (e.g. to write it as a shard); the
    answer then holds no descriptors, only the indices seen and the errors. Blocks come in completion order: rows
    carry their input index. `progress` shows one bar of images described (Ray Data's own bars stay off).
    """
    if not uris:
        return RayEmbedding(np.zeros(0, dtype=np.int64), np.zeros((0, net.meta["dim"]), dtype=np.float32))
    ensure_ray()
    _log_through_ours()
    if use_gpu:  # one GPU an actor: never wait for actors the cluster has no GPU for
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus < 1:
            raise FiresightError("GPU embedding asked for (ray.use_gpu), but the Ray cluster has no GPU")
        if gpus < actors:
            log.info("embedding on %d actors, one per GPU (%d asked for)", gpus, actors)
            actors = gpus
    ray.data.DataContext.get_current().enable_progress_bars = False
    model = ray.put({"meta": net.meta, "state_dict": {k: v.cpu() for k, v in net.state_dict().items()}})
    items = ray.data.from_items([{INDEX: i, URI: str(u)} for i, u in enumerate(uris)],
                                override_num_blocks=max(1, min(len(uris) // batch_size, 200)))
    described = items.map_batches(
        _Describer, fn_constructor_kwargs={"model": model, "batch_size": batch_size, "use_gpu": use_gpu},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0)
    # Ray Data's actor pool restarts a dead actor and retries its batch by default (max_restarts=-1)
    indices, blocks, errors = [], [], {}
    bar = tqdm(total=len(uris), desc=desc, unit="image", disable=not progress)
    for batch in described.iter_batches(batch_format="numpy", batch_size=None):
        bar.update(len(batch[INDEX]))
        failed = batch[ERROR] != ""
        errors.update({int(i): str(e) for i, e in zip(batch[INDEX][failed], batch[ERROR][failed], strict=True)})
        good_idx, good = batch[INDEX][~failed], batch[DESCRIPTOR][~failed]
        indices.append(good_idx)
        if on_block is not None:
            on_block(good_idx, good)
        else:
            blocks.append(good)
    bar.close()
    order = np.argsort(np.concatenate(indices))
    x = np.concatenate(blocks)[order] if blocks else np.zeros((0, net.meta["dim"]), dtype=np.float32)
    return RayEmbedding(np.concatenate(indices)[order], x, errors)


def ray_describer(*, actors: int, cpus_per_actor: float = 1, use_gpu: bool = False):
    """`embed_with_ray` as a `components.catalog.indexing.Describe`: (net, uris, batch size) -> (descriptors of the
    described images in input order, {input position: why not})."""

    def describe(net: RetrievalNet, uris: list[str], batch_size: int) -> tuple[np.ndarray, dict[int, str]]:
        got = embed_with_ray(net, uris, batch_size=batch_size, actors=actors, cpus_per_actor=cpus_per_actor,
                             use_gpu=use_gpu, progress=True, desc="embedding")
        return got.descriptors, got.errors

    return describe
