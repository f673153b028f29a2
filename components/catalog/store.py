"""A living search index in a folder or under an s3:// prefix: written by the index stage, grown and shrunk by
`firesight index add/remove`, read by search — one code path for all three.

Layout: `<location>/CURRENT` names the live generation `<location>/gNNNNNN/`, which holds
- `faiss.index`: the searched vectors under stable int64 ids, never positions (an IndexIDMap2, or IVF's own ids) (after DBA if the
  model's reranking has it);
- `descriptors.npy`: the descriptors as the model gave them, row i ↔ entry i (for DBA of new images, re-ranking and
  the evaluation);
- `entries.parquet`: faiss_id, id (the image's sha256), label, uri, added_at;
- `index.json`: format, the model's identity (`weights_sha256`, arch, dim, image size, scales, reranking, registry
  version when known), kind and search parameters, count, built_at, updated_at, next_id.
A write makes a complete new generation, then replaces CURRENT (one atomic rename, or one S3 PUT): a crash at any
point leaves the previous generation live and readable, and the write can be rerun. Local writers take a lock.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

from components.catalog.describe import DIGEST_KEY
from components.data.contract import ID, LABEL, URI
from components.errors import FiresightError
from components.search.index import IndexSpec, _check_unit_rows, build_index_from_shards, new_index, set_search_parameters
from components.search.postprocess import Reranking, database_augmentation, reranking_of
from components.storage import (atomic_write_path, is_remote, read_bytes, remove_tree, s3_errors,
                                s3_filesystem)

FORMAT = 1
CURRENT = "CURRENT"
FAISS_ID = "faiss_id"
ADDED_AT = "added_at"
ENTRY_COLUMNS = [FAISS_ID, ID, LABEL, URI, ADDED_AT]
_GENERATION = re.compile(r"^g(\d{6})$")
_FILES = ("faiss.index", "descriptors.npy", "entries.parquet", "index.json")


class CatalogError(FiresightError):
    """A missing or unreadable index, or a write it refuses."""


class ModelMismatch(CatalogError):
    """Descriptors from one model offered to an index built by another."""


def content_id(data: bytes) -> str:
    """An image's id: the sha256 of its bytes, as ingest and the index record it."""
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def model_identity(meta: dict[str, Any], registry_version: str | None = None) -> dict[str, Any]:
    """What index.json records of the model: enough to refuse another model and to say which one to use."""
    return {DIGEST_KEY: meta[DIGEST_KEY], "arch": meta["arch"], "dim": int(meta["dim"]),
            "image_size": int(meta["image_size"]), "scales": list(meta.get("scales", [1.0])),
            "reranking": meta.get("reranking") or {}, "registry_version": registry_version}


@dataclass
class AddReport:
    added: list[int]  # the new entries' faiss ids
    already_indexed: dict[str, int]  # image sha256 → the faiss id it already has (not added again)
    undescribed: list[dict[str, str]] = field(default_factory=list)  # {file, reason}: could not be embedded


@dataclass
class SearchIndex:
    """One generation of an index, loaded whole (search, add and remove work on it in memory; writes make the next
    generation)."""

    location: str
    info: dict[str, Any]
    entries: pd.DataFrame
    descriptors: np.ndarray
    faiss_index: faiss.Index

    # -- reading ---------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, location: str | Path) -> SearchIndex:
        """The live generation at `location`; `CatalogError` naming the location if there is none or it is broken."""
        location = str(location).rstrip("/")
        for attempt in range(2):  # a writer may drop the generation being read right after replacing it: read again
            generation = _read_current(location)
            base = f"{location}/{generation}"
            try:
                info = json.loads(_read(f"{base}/index.json"))
                entries = pd.read_parquet(io.BytesIO(_read(f"{base}/entries.parquet")))
                descriptors = np.load(io.BytesIO(_read(f"{base}/descriptors.npy")), allow_pickle=False)
                index = faiss.deserialize_index(np.frombuffer(_read(f"{base}/faiss.index"), dtype=np.uint8))
                break
            except FileNotFoundError as e:
                if attempt or _read_current(location) == generation:
                    raise CatalogError(f"{base}: incomplete index generation ({e.filename or e}); rebuild it with "
                                       "`dvc repro index`") from None
            except (ValueError, RuntimeError, OSError) as e:
                raise CatalogError(f"{base}: unreadable index generation ({e}); rebuild it with `dvc repro index`") \
                    from None
        if info.get("format") != FORMAT:
            raise CatalogError(f"{base}: index format {info.get('format')} is not {FORMAT}; rebuild it")
        if not (len(entries) == len(descriptors) == index.ntotal == info["count"]):
            raise CatalogError(f"{base}: entries ({len(entries)}), descriptors ({len(descriptors)}) and the faiss "
                               f"index ({index.ntotal}) disagree; rebuild it")
        out = cls(location, info, entries, descriptors, index)
        out.set_search_parameters(IndexSpec(**info["spec"]))
        return out

    @property
    def model(self) -> dict[str, Any]:
        return self.info["model"]

    @property
    def reranking(self) -> Reranking:
        return reranking_of(self.model)

    def summary(self) -> dict[str, Any]:
        """`firesight index info`: what a user checks before trusting an answer."""
        return {"location": self.location, "generation": self.info["generation"], "count": len(self.entries),
                "classes": int(self.entries[LABEL].nunique()), "kind": self.info["spec"]["kind"],
                "dim": self.model["dim"], "model": self.model, "built_at": self.info["built_at"],
                "updated_at": self.info["updated_at"]}

    def check_model(self, meta: dict[str, Any]) -> None:
        """`ModelMismatch` unless `meta` is the model this index was built with (same weights digest)."""
        have, want = meta.get(DIGEST_KEY), self.model[DIGEST_KEY]
        if have != want:
            built = self.model.get("registry_version")
            built = f"registry version {built}, " if built else ""
            raise ModelMismatch(
                f"{self.location}: built with model weights {want[:12]} ({built}{self.model['arch']}, "
                f"{self.model['image_size']} px) but the model given has weights {str(have)[:12]}: descriptor "
                "spaces must not mix — use the index's model, or rebuild the index with this one")

    def set_search_parameters(self, spec: IndexSpec) -> None:
        set_search_parameters(self.faiss_index, spec)

    def rows_of(self, faiss_ids: np.ndarray) -> np.ndarray:
        """Entry row positions of faiss ids (−1 for an id not in the index, or faiss's −1 for "not found"). Entries
        are in increasing faiss id (ids are handed out in order and removal keeps the order), so a binary search."""
        ids, wanted = self.entries[FAISS_ID].to_numpy(), np.asarray(faiss_ids)
        if not len(ids):
            return np.full(wanted.shape, -1, dtype=np.int64)
        rows = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
        return np.where(ids[rows] == wanted, rows, -1).astype(np.int64)

    # -- writing ---------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, location: str | Path, descriptors: np.ndarray, images: pd.DataFrame, model: dict[str, Any],
              spec: IndexSpec = IndexSpec()) -> SearchIndex:
        """Write a new index of `descriptors` (row i ↔ `images` row i: id, label, uri) at `location`, replacing any
        index there (as one new generation: readers of the old one are never broken)."""
        x = _check_unit_rows(descriptors, "descriptors")
        if len(images) != len(x):
            raise ValueError(f"{len(images)} images but {len(x)} descriptors")
        if x.shape[1] != model["dim"]:
            raise ValueError(f"descriptors are {x.shape[1]}-d but the model's are {model['dim']}-d")
        entries = _entries(images, np.arange(len(x), dtype=np.int64))
        spec = spec.for_size(*x.shape)
        searched = _augmented(x, reranking_of(model))
        index = build_index_from_shards([lambda: searched], spec, first_id=0)
        now = _now()
        info = {"format": FORMAT, "model": model, "spec": dataclasses.asdict(spec), "count": len(x),
                "built_at": now, "updated_at": now, "next_id": len(x)}
        out = cls(str(location).rstrip("/"), info, entries, x, index)
        out.set_search_parameters(spec)
        with _writer_lock(out.location):
            out._commit()
        return out

    def add(self, descriptors: np.ndarray, images: pd.DataFrame, model_meta: dict[str, Any]) -> AddReport:
        """Add images (id, label, uri) with their descriptors from `model_meta`'s model, then write the next
        generation. Images already in the index (same sha256) are reported, not added twice, so an interrupted add
        can simply be rerun (a file given twice is added once). New items are DBA-augmented over the whole database, old ones keep theirs."""
        self.check_model(model_meta)
        x = _check_unit_rows(descriptors, "descriptors") if len(descriptors) else np.zeros((0, self.model["dim"]),
                                                                                           np.float32)
        if len(images) != len(x):
            raise ValueError(f"{len(images)} images but {len(x)} descriptors")
        known = dict(zip(self.entries[ID], self.entries[FAISS_ID].astype(int)))
        fresh = ~images[ID].isin(known).to_numpy() & ~images[ID].duplicated().to_numpy()
        report = AddReport([], {i: known[i] for i in images[ID] if i in known})
        if not fresh.any():
            return report
        x, images = x[fresh], images[fresh].reset_index(drop=True)
        with _writer_lock(self.location):
            self._reload_if_stale()
            ids = np.arange(self.info["next_id"], self.info["next_id"] + len(x), dtype=np.int64)
            everything = np.concatenate([self.descriptors, x])
            searched = _augmented(everything, self.reranking)[len(self.descriptors):]
            self.faiss_index.add_with_ids(searched, ids)
            self.entries = pd.concat([self.entries, _entries(images, ids)], ignore_index=True)
            self.descriptors = everything
            self.info.update(count=len(self.entries), next_id=int(ids[-1]) + 1, updated_at=_now())
            self._commit()
        report.added = ids.tolist()
        return report

    def remove(self, faiss_ids: list[int]) -> list[int]:
        """Remove entries by faiss id and write the next generation; the ids removed (unknown ones are ignored and
        left out of the answer)."""
        with _writer_lock(self.location):
            self._reload_if_stale()
            keep = ~self.entries[FAISS_ID].isin(faiss_ids).to_numpy()
            gone = self.entries.loc[~keep, FAISS_ID].astype(int).tolist()
            if not gone:
                return []
            try:
                self.faiss_index.remove_ids(np.asarray(gone, dtype=np.int64))
            except RuntimeError:  # HNSW graphs cannot drop nodes: rebuild the graph from the kept vectors
                self._rebuild_without(keep)
            self.entries = self.entries[keep].reset_index(drop=True)
            self.descriptors = self.descriptors[keep]
            self.info.update(count=len(self.entries), updated_at=_now())
            self._commit()
        return gone

    def _rebuild_without(self, keep: np.ndarray) -> None:
        spec = IndexSpec(**self.info["spec"])
        kept_ids = self.entries.loc[keep, FAISS_ID].to_numpy(np.int64)
        vectors = np.stack([self.faiss_index.reconstruct(int(i)) for i in kept_ids]) if len(kept_ids) else \
            np.zeros((0, self.model["dim"]), np.float32)
        index = new_index(spec, self.model["dim"], with_ids=True)
        index.add_with_ids(vectors, kept_ids)
        self.faiss_index = index
        self.set_search_parameters(spec)

    def _reload_if_stale(self) -> None:
        """Under the writer lock: refuse to write over a generation another writer made after this one was read."""
        live = _read_current(self.location)
        if live != self.info["generation"]:
            raise CatalogError(f"{self.location}: changed since it was opened ({self.info['generation']} → {live}); "
                               "open it again and retry")

    def _commit(self) -> None:
        """Write this state as the next generation, then point CURRENT at it and drop the older ones."""
        generations = _generations(self.location)
        number = max((int(_GENERATION.match(g).group(1)) for g in generations), default=0) + 1
        name = f"g{number:06d}"
        self.info["generation"] = name
        base = f"{self.location}/{name}"
        buf = io.BytesIO()
        np.save(buf, self.descriptors, allow_pickle=False)
        parquet = io.BytesIO()
        self.entries.to_parquet(parquet, index=False)
        payload = {"faiss.index": faiss.serialize_index(self.faiss_index).tobytes(), "descriptors.npy": buf.getvalue(),
                   "entries.parquet": parquet.getvalue(),
                   "index.json": (json.dumps(self.info, indent=2) + "\n").encode()}
        for file in _FILES:  # index.json last: a generation without it was never finished
            _write(f"{base}/{file}", payload[file])
        _write(f"{self.location}/{CURRENT}", (name + "\n").encode())
        for old in generations:
            if old != name:
                remove_tree(f"{self.location}/{old}")


def _entries(images: pd.DataFrame, ids: np.ndarray) -> pd.DataFrame:
    missing = {ID, LABEL, URI} - set(images.columns)
    if missing:
        raise ValueError(f"images need columns {sorted(missing)}")
    return pd.DataFrame({FAISS_ID: ids, ID: images[ID].astype(str).to_numpy(), LABEL: images[LABEL].astype(str).to_numpy(),
                         URI: images[URI].astype(str).to_numpy(), ADDED_AT: _now()})[ENTRY_COLUMNS]


def _augmented(x: np.ndarray, reranking: Reranking) -> np.ndarray:
    return database_augmentation(x, reranking.dba_k, reranking.dba_alpha) if reranking.dba_k and len(x) else x


def _read_current(location: str) -> str:
    try:
        name = _read(f"{location}/{CURRENT}").decode().strip()
    except FileNotFoundError:
        raise CatalogError(f"{location}: no index here (no {CURRENT} file); build one with `dvc repro index`") from None
    if not _GENERATION.match(name):
        raise CatalogError(f"{location}/{CURRENT}: names {name!r}, not an index generation")
    return name


def _read(uri: str) -> bytes:
    if is_remote(uri):
        with s3_errors("read", uri):
            return s3_filesystem().cat_file(uri)
    return Path(uri).read_bytes()


def _write(uri: str, data: bytes) -> None:
    if is_remote(uri):
        with s3_errors("write", uri):
            s3_filesystem().pipe_file(uri, data)
        return
    with atomic_write_path(uri) as tmp:
        tmp.write_bytes(data)


def _generations(location: str) -> list[str]:
    if is_remote(location):
        with s3_errors("list", location):
            try:
                names = [p.rstrip("/").rsplit("/", 1)[-1] for p in s3_filesystem().ls(location, detail=False)]
            except FileNotFoundError:
                names = []
    else:
        names = [p.name for p in Path(location).iterdir()] if Path(location).is_dir() else []
    return sorted(n for n in names if _GENERATION.match(n))


@contextmanager
def _writer_lock(location: str) -> Iterator[None]:
    """One writer at a time on a local index (an flock on `<location>/.lock`); S3 indexes assume one writer."""
    if is_remote(location):
        yield
        return
    Path(location).mkdir(parents=True, exist_ok=True)
    with open(Path(location) / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
