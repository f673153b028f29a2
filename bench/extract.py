"""Descriptor extraction: images/s of the index stage's embedding paths (`embed_images`: decode, resize and pad,
forward, in one process; and the same on Ray Data actors, `index.engine: ray`) against the limit, a bare torch loop
over already decoded and resized tensors with the same model, batch size and threads; the decode and resize costs
alone; and the effect of batch size and thread count."""

from __future__ import annotations

import statistics
import time
from typing import Any

import ray
import torch

from bench.data import real_images
from bench.measure import goal, interleaved_rates, measured, ratio
from components.data.images import load_rgb
from components.data.transforms import BatchTransform
from components.distributed import ensure_ray
from components.search.embed import embed_images
from components.search.ray_embed import embed_with_ray
from pipelines.common import net_spec
from pipelines.params import load_params

GOAL_RATIO = 0.9
SIZES = {"quick": {"images": 64, "rounds": 2, "grid_images": 32, "batch_sizes": (1, 32)},
         "full": {"images": 320, "rounds": 3, "grid_images": 128, "batch_sizes": (1, 2, 4, 8, 32)}}
THREADS = (1, 2)
RAY_REPEAT = 4  # a Ray Data run describes the images this many times: long enough for a steady rate


def run(mode: str) -> dict[str, Any]:
    size = SIZES[mode]
    params = load_params()
    images = real_images(limit=size["images"])
    net = net_spec(params.model).build().eval()
    side, batch_size, default_threads = params.model.image_size, params.index.batch_size, torch.get_num_threads()
    transform = BatchTransform.for_eval(net.meta, side)

    with measured() as decode:
        decoded = [load_rgb(u) for u in images.uris]
    with measured() as resize:
        tensors = torch.cat([transform([(img,)])[0] for img in decoded])
    with measured() as forward:
        _bare_forward(net, tensors, batch_size)
    per_image = {name: round(1000 * r["wall_seconds"] / len(images), 3)
                 for name, r in (("decode", decode), ("resize_and_pad", resize), ("forward", forward))}

    def rivals(n: int, batch: int) -> dict:
        return {"bare torch": lambda: _bare_forward(net, tensors[:n], batch),
                "firesight": lambda: embed_images(net, images.uris[:n], batch_size=batch, image_size=side)}

    main = interleaved_rates(rivals(len(images), batch_size), work=len(images), rounds=size["rounds"])
    main_ratio = ratio(main["firesight"]["rate"], main["bare torch"]["rate"])
    on_ray = _ray_data(net, images.uris, tensors, batch_size, size["rounds"],
                       default=(params.index.actors, params.ray.cpus_per_worker))
    grid = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for batch in size["batch_sizes"]:
            rates = interleaved_rates(rivals(size["grid_images"], batch), work=size["grid_images"], rounds=1)
            grid.append({"threads": threads, "batch_size": batch, "bare_images_per_s": rates["bare torch"]["rate"],
                         "firesight_images_per_s": rates["firesight"]["rate"],
                         "ratio": ratio(rates["firesight"]["rate"], rates["bare torch"]["rate"]),
                         "loadavg_start": rates["bare torch"]["loadavg_start"]})
    torch.set_num_threads(default_threads)
    return {
        "images": {"source": images.source, "count": len(images), "classes": len(set(images.labels))},
        "model": {"arch": params.model.backbone, "pooling": params.model.pooling_spec().name, "image_size": side,
                  "batch_size": batch_size, "threads": default_threads},
        "ms_per_image": per_image,
        "decode": decode, "resize_and_pad": resize, "forward": forward,
        "comparison": main,
        "ratio": main_ratio,
        "ray_data": on_ray,
        "grid": grid,
        "goals": [goal("extraction: in-process path (index.engine local) vs bare torch", main_ratio, GOAL_RATIO),
                  goal(f"extraction: Ray Data path (index.engine ray, {params.index.actors} actors), steady, "
                       "vs bare torch", on_ray[-1]["steady_ratio_vs_bare"], GOAL_RATIO)],
    }


def _ray_data(net: torch.nn.Module, uris: list[str], tensors: torch.Tensor, batch_size: int, rounds: int,
              default: tuple[int, int]) -> list[dict[str, Any]]:
    """`embed_with_ray` on a warm local Ray, 1 actor with every core and the index stage's `default` (actors, CPUs
    each), over the images `RAY_REPEAT` times, in rounds interleaved with the bare loop over as many tensors (Ray's
    idle processes running under both). Each run starts its actors (what the index stage pays): the time to its
    first block is that start-up, and the images after the first block over the time to the last are its steady
    rate."""
    ensure_ray()
    cores = int(ray.cluster_resources().get("CPU", 1))
    images = RAY_REPEAT * len(uris)
    runs = []
    for actors, cpus in dict.fromkeys([(1, cores), default]):
        bare, steady, startup, walls = [], [], [], []
        with measured() as record:
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(RAY_REPEAT):
                    _bare_forward(net, tensors, batch_size)
                bare.append(images / (time.perf_counter() - start))
                arrivals: list[tuple[float, int]] = []
                start = time.perf_counter()
                embed_with_ray(net, uris * RAY_REPEAT, batch_size=batch_size, actors=actors, cpus_per_actor=cpus,
                               on_block=lambda got, _, seen=arrivals: seen.append((time.perf_counter(), len(got))))
                walls.append(time.perf_counter() - start)
                startup_seconds, rate = stream_rates(start, arrivals)
                startup.append(startup_seconds)
                steady.append(rate)
        runs.append({**record, "actors": actors, "cpus_per_actor": cpus, "images": images, "rounds": rounds,
                     "wall_seconds": round(statistics.median(walls), 1),
                     "startup_seconds": round(statistics.median(startup), 1),
                     "steady_images_per_s": round(statistics.median(steady), 1),
                     "steady_rates": [round(x, 1) for x in steady],
                     "bare_images_per_s": round(statistics.median(bare), 1), "bare_rates": [round(x, 1) for x in bare],
                     "steady_ratio_vs_bare": ratio(statistics.median(steady), statistics.median(bare))})
    ray.shutdown()
    return runs


def stream_rates(start: float, arrivals: list[tuple[float, int]]) -> tuple[float, float]:
    """A stream's start-up (from `start` to its first block) and steady rate (the items after the first block over
    the time from the first block to the last), from (arrival time, items) of each block."""
    (first, first_items), (last, _) = arrivals[0], arrivals[-1]
    return first - start, (sum(n for _, n in arrivals) - first_items) / (last - first)


@torch.inference_mode()
def _bare_forward(net: torch.nn.Module, tensors: torch.Tensor, batch_size: int) -> None:
    for batch in tensors.split(batch_size):
        net(batch)
