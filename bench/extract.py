"""Descriptor extraction: images/s of the index stage's embedding paths (`embed_images`: decode, resize and pad,
forward, in one process; and the same on Ray Data actors, `index.engine: ray`) against the limit, a bare torch loop
over already decoded and resized tensors with the same model, batch size and threads; the decode and resize costs
alone; and the effect of batch size and thread count."""

from __future__ import annotations

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
         "full": {"images": 320, "rounds": 3, "grid_images": 128, "batch_sizes": (1, 8, 32, 64)}}
THREADS = (1, 2)


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
    on_ray = _ray_data(net, images.uris, batch_size, main["bare torch"]["rate"])
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
        "goals": [goal("extraction: index-stage path vs bare torch", main_ratio, GOAL_RATIO)],
    }


def _ray_data(net: torch.nn.Module, uris: list[str], batch_size: int, bare_rate: float) -> list[dict[str, Any]]:
    """`embed_with_ray` on a warm local Ray, 1 actor with every core and one actor per core, each over the images
    and over them 4 times: the wall times include starting the actors (what the index stage pays), and the two sizes
    split them into a fixed start-up and a steady rate."""
    ensure_ray()
    cores = int(ray.cluster_resources().get("CPU", 1))
    runs = []
    for actors, cpus in ((1, cores), (cores, 1)):
        walls = {}
        for repeat in (1, 4):
            with measured() as walls[repeat]:
                embed_with_ray(net, uris * repeat, batch_size=batch_size, actors=actors, cpus_per_actor=cpus)
        steady = round(3 * len(uris) / (walls[4]["wall_seconds"] - walls[1]["wall_seconds"]), 1)
        runs.append({"actors": actors, "cpus_per_actor": cpus, "images": len(uris), "runs": walls,
                     "wall_seconds": walls[1]["wall_seconds"], "loadavg_start": walls[1]["loadavg_start"],
                     "loadavg_end": walls[4]["loadavg_end"],
                     "images_per_s": round(len(uris) / walls[1]["wall_seconds"], 1), "steady_images_per_s": steady,
                     "startup_seconds": round(walls[1]["wall_seconds"] - len(uris) / steady, 1),
                     "ratio_vs_bare": ratio(len(uris) / walls[1]["wall_seconds"], bare_rate),
                     "steady_ratio_vs_bare": ratio(steady, bare_rate)})
    ray.shutdown()
    return runs


@torch.inference_mode()
def _bare_forward(net: torch.nn.Module, tensors: torch.Tensor, batch_size: int) -> None:
    for batch in tensors.split(batch_size):
        net(batch)
