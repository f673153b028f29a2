"""JPEG decoding at reduced scale (`model.draft_decode`): the decode alone, full vs draft, on the fine-grained set's
real JPEGs (cub100, ../shared/datasets/cub100, about 500 × 375) and on phone-sized copies of them (each upscaled to
a 4000-px longer side, 12 MP, re-encoded at quality 90: a moderation team's uploads); and on those, the index
stage's embedding path with and without it against a bare torch loop over pre-decoded tensors."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench.data import IMAGE_SUFFIXES
from bench.extract import _bare_forward
from bench.measure import goal, interleaved_rates, ratio
from components.data.images import decode_side, load_rgb
from components.data.transforms import BatchTransform
from components.search.embed import embed_images
from pipelines.common import net_spec
from pipelines.params import load_params

FINE_GRAINED = Path("../shared/datasets/cub100")
PHONE_SIDE = 4000
SIZES = {"quick": {"images": 32, "phones": 8, "rounds": 2}, "full": {"images": 192, "phones": 48, "rounds": 3}}


def run(mode: str) -> dict[str, Any]:
    size = SIZES[mode]
    if not FINE_GRAINED.is_dir():
        return {"skipped": f"{FINE_GRAINED} is not here"}
    uris = _jpegs(size["images"])
    params = load_params()
    full, drafted = (net_spec(params.model.model_copy(update={"draft_decode": on})).build().eval() for on in (False, True))
    side, batch_size = params.model.image_size, params.index.batch_size
    draft_side = decode_side(drafted.meta)
    with tempfile.TemporaryDirectory() as tmp:
        phones = [_phone_copy(u, Path(tmp) / f"{i}.jpg") for i, u in enumerate(uris[:size["phones"]])]
        decode = {name: _decode_rates(files, draft_side, size["rounds"])
                  for name, files in (("cub100 JPEGs", uris), (f"{PHONE_SIDE}-px copies", phones))}
        transform = BatchTransform.for_eval(full.meta, side)
        tensors = torch.cat([transform([(load_rgb(u),)])[0] for u in phones])
        embedding = interleaved_rates({
            "bare torch": lambda: _bare_forward(full, tensors, batch_size),
            "firesight, full decode": lambda: embed_images(full, phones, batch_size=batch_size),
            "firesight, draft decode": lambda: embed_images(drafted, phones, batch_size=batch_size),
        }, work=len(phones), rounds=size["rounds"])
    bare = embedding["bare torch"]["rate"]
    ratios = {name: ratio(r["rate"], bare) for name, r in embedding.items() if name != "bare torch"}
    return {
        "images": {"source": str(FINE_GRAINED), "count": len(uris), "phones": size["phones"],
                   "mean_size": _mean_size(uris)},
        "model": {"arch": params.model.backbone, "image_size": side, "draft_side": draft_side,
                  "batch_size": batch_size, "threads": torch.get_num_threads()},
        "decode": decode, "embedding": embedding, "ratios": ratios,
        "goals": [goal(f"extraction of {PHONE_SIDE}-px JPEGs with draft decoding vs bare torch",
                       ratios["firesight, draft decode"], 0.9)],
    }


def _jpegs(limit: int) -> list[str]:
    """Up to `limit` cub100 JPEGs, one class after another in turn (any prefix covers many classes)."""
    folders = sorted(d for d in FINE_GRAINED.iterdir() if d.is_dir())
    files = [sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for d in folders]
    rows = [str(fs[i].resolve()) for i in range(max(map(len, files))) for fs in files if i < len(fs)]
    return rows[:limit]


def _phone_copy(uri: str, path: Path) -> str:
    im = load_rgb(uri)
    scale = PHONE_SIDE / max(im.size)
    im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC).save(path, quality=90)
    return str(path)


def _decode_rates(uris: list[str], draft_side: int, rounds: int) -> dict[str, Any]:
    rates = interleaved_rates({"full": lambda: [load_rgb(u) for u in uris],
                               "draft": lambda: [load_rgb(u, draft_side=draft_side) for u in uris]},
                              work=len(uris), rounds=rounds)
    return {"ms_per_image": {k: round(1000 / r["rate"], 2) for k, r in rates.items()},
            "speedup": ratio(rates["draft"]["rate"], rates["full"]["rate"]), "rates": rates}


def _mean_size(uris: list[str]) -> list[int]:
    sizes = [Image.open(u).size for u in uris]
    return [round(sum(s[0] for s in sizes) / len(sizes)), round(sum(s[1] for s in sizes) / len(sizes))]
