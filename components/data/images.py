"""Image files (local paths or s3:// URIs): one decode path for every stage — ingest validates with it, training,
indexing and evaluation load with it — so every stage sees the same upright pixels.

Decoding opens the header, refuses more than `max_pixels` before any pixel is decoded, loads every pixel, applies
the EXIF orientation (the displayed image, not the stored one) and converts to 8-bit RGB. Given `draft_side` (the
longer side the caller will resize to), a JPEG larger than twice that is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's
DCT scaling, PIL draft mode) — as long as its longer side stays at least `draft_side` — which costs a fraction of a
full decode. Ingest reads a file only
after its size passed the byte cap, and a file longer than `SNIFF_BYTES` has its header checked before the rest
is read.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from components.errors import DataError
from components.storage import is_remote, open_input, s3_errors, s3_filesystem

SNIFF_BYTES = 64 * 2**10  # head read first: enough for the header of common formats
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
DRAFT_DECODE = "draft_decode"  # meta key: a net's JPEGs may be decoded at reduced scale (`decode_side`)


def decode_side(meta: dict, image_size: int | None = None, scales: Sequence[float] | None = None,
                object_cropped: bool | None = None) -> int | None:
    """The longer side a JPEG may be draft-decoded down to before it is described with `meta` at `image_size`,
    `scales` and `object_cropped` (defaults: as the meta says): the largest scale's side; None (a full decode) unless
    meta[DRAFT_DECODE], or when images are object-cropped (the crop keeps only part of the decoded pixels)."""
    if object_cropped is None:
        object_cropped = bool(meta.get("object_crop"))
    if not meta.get(DRAFT_DECODE) or object_cropped:
        return None
    size = image_size or meta["image_size"]
    return max(round(s * size) for s in (meta.get("scales", [1.0]) if scales is None else scales))


class BadImage(DataError):
    """A file that is not a usable image; `reason` is a short human explanation (without the file name)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """The displayed (EXIF-oriented) size and the format of a decoded image."""

    width: int
    height: int
    format: str


def probe_image(uri: Path | str, *, min_side: int, max_bytes: int, max_pixels: int) -> tuple[bytes, ImageInfo]:
    """The bytes of the image at `uri` (a path or s3:// URI) and its info, decoded by content, never by extension.

    Raises `BadImage` for a missing, unreadable, empty, oversized (bytes or pixels), non-image, truncated/corrupt,
    unconvertible or too small file; `StorageError` (an unreachable endpoint, rejected credentials) passes through.
    """
    data = _read_capped(str(uri), max_bytes, max_pixels)
    image, fmt = _decode(io.BytesIO(data), max_pixels)
    width, height = image.size
    if min(width, height) < min_side:
        raise BadImage(f"too small: {width}x{height} < min side {min_side}")
    return data, ImageInfo(width=width, height=height, format=fmt)


def load_rgb(uri: Path | str, max_pixels: int | None = None, *, draft_side: int | None = None) -> Image.Image:
    """Load a local or s3:// image upright as 8-bit RGB (alpha composited on white, 16-bit and float scaled to
    8 bits). `max_pixels`: refuse larger images (None: the manifest's images passed ingest's cap; PIL's
    decompression-bomb check always applies). `draft_side`: a JPEG may be decoded at reduced scale down to this
    longer side. Raises `DataError` naming the file if it cannot be used, `StorageError` if its endpoint fails."""
    try:
        with open_input(uri) as f:
            return _decode(f, max_pixels, draft_side)[0]
    except BadImage as e:
        raise DataError(f"{uri}: cannot read image: {e.reason}") from None
    except OSError as e:
        raise DataError(f"{uri}: cannot read image: {e.strerror or e}") from None


def decode_rgb(data: bytes, max_pixels: int | None = None, *, draft_side: int | None = None) -> Image.Image:
    """Decode in-memory image bytes (an upload) as `load_rgb` decodes a file; `BadImage` with the reason if they are
    not a usable image or have more than `max_pixels`."""
    return _decode(io.BytesIO(data), max_pixels, draft_side)[0]


def _decode(source: IO[bytes], max_pixels: int | None, draft_side: int | None = None) -> tuple[Image.Image, str]:
    """The upright 8-bit RGB image in `source` and its format; `BadImage` if it is not a usable image."""
    try:
        with _open_checked(source, max_pixels) as im:
            if draft_side is not None and im.format == "JPEG":
                _draft(im, draft_side)
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            return _to_rgb(im), im.format or "unknown"
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large (possible decompression bomb): {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (cannot identify format)") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise BadImage(f"truncated or corrupt: {str(e) or type(e).__name__}") from None


def _draft(im: Image.Image, side: int) -> None:
    """Set a JPEG's decoder to the smallest DCT scale (1/2, 1/4, 1/8) whose longer side is still >= `side`."""
    width, height = im.size
    shrink = side / max(width, height)
    if shrink <= 0.5:  # PIL picks the largest scale factor that keeps the image at least the requested size
        im.draft(None, (math.ceil(width * shrink), math.ceil(height * shrink)))


def _open_checked(source: IO[bytes], max_pixels: int | None) -> Image.Image:
    """Open `source` lazily (its header only) and refuse more than `max_pixels` (if given) before any pixel is
    decoded.

    PIL's own decompression-bomb error still applies; its warning is silenced, `max_pixels` being the policy.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(source)
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        im.close()
        raise BadImage(f"too many pixels: {width}x{height} = {width * height / 1e6:.1f} MP > ingest.max_pixels "
                       f"{max_pixels / 1e6:.1f} MP")
    return im


def _read_capped(uri: str, max_bytes: int, max_pixels: int) -> bytes:
    """The bytes of a local file or an s3:// object, never reading more than `max_bytes` + 1 of them.

    A file whose size is over the cap is refused unread; a longer one than `SNIFF_BYTES` has its header checked
    (`_open_checked`) before the rest is read. A head PIL cannot parse is read whole (under the cap) and left to
    the decode: some formats need more than the head (JPEG metadata segments before the frame header, TIFF
    directories at the end).
    """
    try:
        with ExitStack() as stack:
            size, read = _open_sized(uri, stack)
            if size > max_bytes:
                raise BadImage(f"file too large: {_in_units(size)} > ingest.max_file_bytes {_in_units(max_bytes)}")
            limit = max_bytes + 1  # one byte over the cap tells a file that grew after its size was taken
            data = read(min(SNIFF_BYTES, limit))
            if len(data) == SNIFF_BYTES < limit:
                try:
                    _open_checked(io.BytesIO(data), max_pixels).close()
                except BadImage:
                    raise
                except Exception:  # noqa: BLE001 - not parsable from the head alone: the full decode judges
                    pass
                data += read(limit - SNIFF_BYTES)
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except PermissionError as e:
        raise BadImage(f"unreadable: {e.strerror}") from None
    if len(data) > max_bytes:
        raise BadImage(f"file too large: more than ingest.max_file_bytes {_in_units(max_bytes)} (it grew while "
                       "being read)")
    if not data:
        raise BadImage("empty file")
    return data


def _open_sized(uri: str, stack: ExitStack) -> tuple[int, Callable[[int], bytes]]:
    """(size, read(n)) of a local regular file or an s3:// object, opened in `stack`, nothing read yet."""
    if is_remote(uri):
        with s3_errors("read", uri):  # fetches the object's size; each read is one ranged GET of exactly n bytes
            f = stack.enter_context(s3_filesystem().open(uri, "rb", cache_type="none"))

        def read(n: int) -> bytes:
            with s3_errors("read", uri):
                return f.read(n)

        return f.size, read
    st = os.stat(uri)
    if not stat.S_ISREG(st.st_mode):  # never open a folder, a FIFO (blocks) or a device
        raise BadImage("not a regular file")
    return st.st_size, stack.enter_context(open(uri, "rb")).read


def _in_units(n: int) -> str:
    """A byte count for messages: "900 B", "12.0 KiB", "64.0 MiB", "1.5 GiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _to_rgb(im: Image.Image) -> Image.Image:
    """A new RGB copy of a loaded image of any mode."""
    if im.mode in _SIXTEEN_BIT_MODES or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0
        im = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8))
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")
