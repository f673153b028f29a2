"""Image files (local paths or s3:// URIs): validation by full decode, and loading as RGB."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.errors import DataError
from components.storage import StorageError, is_remote, open_input

_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


class BadImage(DataError):
    """A file that is not a usable image; `reason` is a short human explanation (without the file name)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str


def read_image_file(uri: Path | str) -> bytes:
    """The bytes of a local file or an s3:// object. Raises `BadImage` for a missing, non-regular, unreadable or
    empty file; `StorageError` (an unreachable endpoint, rejected credentials) passes through."""
    uri = str(uri)
    if not is_remote(uri) and Path(uri).exists() and not Path(uri).is_file():
        raise BadImage("not a regular file")
    try:
        with open_input(uri) as f:
            data = f.read()
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except PermissionError as e:
        raise BadImage(f"unreadable: {e.strerror}") from None
    if not data:
        raise BadImage("empty file")
    return data


def inspect_image(uri: Path | str, min_side: int) -> ImageInfo:
    """Decode the image at `uri` (a path or s3:// URI) by content, never by extension; see `inspect_bytes`."""
    return inspect_bytes(read_image_file(uri), min_side)


def inspect_bytes(data: bytes, min_side: int) -> ImageInfo:
    """Decode an image file's bytes by content, load every pixel and check its size.

    Raises `BadImage` for an empty, non-image, truncated/corrupt, oversized, unconvertible or too small image.
    """
    if not data:
        raise BadImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or "unknown"
            im.load()
            width, height = im.size
            if im.mode != "RGB":
                _to_rgb(im)
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large (possible decompression bomb): {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (cannot identify format)") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise BadImage(f"truncated or corrupt: {str(e) or type(e).__name__}") from None
    if min(width, height) < min_side:
        raise BadImage(f"too small: {width}x{height} < min side {min_side}")
    return ImageInfo(width=width, height=height, format=fmt)


def load_rgb(uri: Path | str) -> Image.Image:
    """Load a local or s3:// image as an 8-bit RGB image (alpha composited on white, 16-bit and float scaled to
    8 bits). Raises `DataError` naming the file if it cannot be read, `StorageError` if its endpoint fails."""
    try:
        with open_input(uri) as f, Image.open(f) as im:
            im.load()
            return _to_rgb(im)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - any decode failure is reported as unusable data
        raise DataError(f"{uri}: cannot read image: {str(e) or type(e).__name__}") from None


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
