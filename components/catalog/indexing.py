"""Embedding images into an index — the index stage's build and `firesight index add` run this same code, so a
rebuilt index and a grown one hold the same descriptors for the same images."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from components.catalog.describe import DIGEST_KEY, model_digest
from components.catalog.store import FAISS_ID, AddReport, SearchIndex, content_id, model_identity
from components.data.contract import ID, LABEL, URI
from components.data.images import BadImage, decode_rgb
from components.data.listing import list_source
from components.errors import DataError
from components.search.embed import embed_images
from components.search.index import IndexSpec
from components.storage import read_bytes


# (net, uris, batch size) -> (descriptors of the described images in input order, {input position: why not})
Describe = Callable[[object, list[str], int], tuple[np.ndarray, dict[int, str]]]


def describe_in_process(net, uris: list[str], batch_size: int) -> tuple[np.ndarray, dict[int, str]]:
    """The single-process `Describe` (the net's meta: resolution, scales, whitening): an unreadable image stops it
    with a DataError naming the file."""
    return embed_images(net, uris, batch_size=batch_size, progress=True, desc="embedding")[1], {}


@dataclass
class Built:
    """A new index and the images it could not describe ({file, reason})."""

    index: SearchIndex
    undescribed: list[dict[str, str]]


def build(location: str, net, images: pd.DataFrame, spec: IndexSpec, batch_size: int,
          registry_version: str | None = None, describe: Describe = describe_in_process) -> Built:
    """Embed `images` (id, label, uri) with `net` through `describe` and write a new index of them at `location`;
    an image `describe` reports as unreadable is left out and named in the answer."""
    meta = {**net.meta, DIGEST_KEY: model_digest(net)}
    descriptors, kept, undescribed = _described(net, images[[ID, LABEL, URI]], batch_size, describe)
    index = SearchIndex.build(location, descriptors, kept, model_identity(meta, registry_version), spec)
    return Built(index, undescribed)


def _described(net, images: pd.DataFrame, batch_size: int, describe: Describe):
    """(descriptors, the images they describe, [{file, reason}] of those `describe` could not read)."""
    images = images.reset_index(drop=True)
    descriptors, errors = describe(net, images[URI].tolist(), batch_size)
    undescribed = [{"file": images[URI][i], "reason": why} for i, why in sorted(errors.items())]
    return descriptors, images.drop(index=list(errors)).reset_index(drop=True), undescribed


@dataclass
class Candidates:
    """Files offered to an index: the usable ones (id, label, uri) and the rest with the reason ({file, reason})."""

    images: pd.DataFrame
    rejected: list[dict[str, str]] = field(default_factory=list)


def candidates(source: str, label_from: str, max_pixels: int | None = None) -> Candidates:
    """The images of `source` — a folder of class folders (`label_from` "folder") or a CSV `path,label`
    ("csv") — each decoded once here to be checked (embedding decodes it again): its sha256 is its id, and one that
    does not decode is rejected with the reason."""
    is_csv = source.lower().endswith(".csv")
    if (label_from == "csv") != is_csv:
        raise DataError(f"{source}: --label-from {label_from} needs "
                        f"{'a .csv listing (path,label)' if label_from == 'csv' else 'a folder of class folders'}")
    listing = list_source(source)
    rows, rejected = [], list(listing.skipped)
    for f in listing.files:
        if f.label is None:
            rejected.append({"file": f.path, "reason": "not inside a class folder"})
            continue
        try:
            data = read_bytes(f.path)
            decode_rgb(data, max_pixels)
        except BadImage as e:
            rejected.append({"file": f.path, "reason": e.reason})
            continue
        except DataError as e:
            rejected.append({"file": f.path, "reason": str(e)})
            continue
        rows.append({ID: content_id(data), LABEL: f.label, URI: f.path})
    if not listing.files:
        raise DataError(f"{source}: no image files found")
    return Candidates(pd.DataFrame(rows, columns=[ID, LABEL, URI]), rejected)


def add(index: SearchIndex, net, images: pd.DataFrame, batch_size: int,
        describe: Describe = describe_in_process) -> AddReport:
    """Embed `images` with `net` (refused unless it is the index's model) through `describe` and add them to
    `index`; images it already holds are not embedded again, and one `describe` reports unreadable is left out and
    named in the report."""
    meta = {**net.meta, DIGEST_KEY: model_digest(net)}
    index.check_model(meta)
    known = dict(zip(index.entries[ID], index.entries[FAISS_ID].astype(int)))
    fresh = images[~images[ID].isin(known) & ~images[ID].duplicated()]
    descriptors, fresh, undescribed = _described(net, fresh, batch_size, describe) if len(fresh) else (None, fresh, [])
    report = index.add(descriptors, fresh, meta) if len(fresh) else AddReport([], {})
    report.already_indexed = {i: known[i] for i in images[ID] if i in known}
    report.undescribed = undescribed
    return report
