"""Descriptor extraction: images/s of the index stage's embedding path (`embed_images`: decode, resize and pad,
forward) against the limit, a bare torch loop over already decoded and resized tensors with the same model, batch
size and threads; the decode and resize costs alone; and the effect of batch size and thread count."""

from __future__ import annotations

from typing import Any

import torch

from bench.data import real_images
from bench.measure import goal, interleaved_rates, measured, ratio
from components.data.images import load_rgb
from components.data.transforms import BatchTransform
from components.search.embed import embed_images
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
        "grid": grid,
        "goals": [goal("extraction: index-stage path vs bare torch", main_ratio, GOAL_RATIO)],
    }


@torch.inference_mode()
def _bare_forward(net: torch.nn.Module, tensors: torch.Tensor, batch_size: int) -> None:
    for batch in tensors.split(batch_size):
        net(batch)
