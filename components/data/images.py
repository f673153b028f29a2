"""Image files: content hash, validation by full decode, and loading as RGB."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.errors import DataError

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


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of the file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def inspect_image(path: Path | str, min_side: int) -> ImageInfo:
    """Decode `path` by content (never by extension), load every pixel and check its size.

    Raises `BadImage` for a missing, empty, unreadable, non-image, truncated/corrupt, oversized, unconvertible
    or too small file.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise BadImage("missing file" if not path.exists() else "not a regular file")
        if path.stat().st_size == 0:
            raise BadImage("empty file")
        with Image.open(path) as im:
            fmt = im.format or "unknown"
            im.load()
            width, height = im.size
            if im.mode != "RGB":
                _to_rgb(im)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large (possible decompression bomb): {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (cannot identify format)") from None
    except PermissionError as e:
        raise BadImage(f"unreadable: {e.strerror}") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise BadImage(f"truncated or corrupt: {str(e) or type(e).__name__}") from None
    if min(width, height) < min_side:
        raise BadImage(f"too small: {width}x{height} < min side {min_side}")
    return ImageInfo(width=width, height=height, format=fmt)


def load_rgb(path: Path | str) -> Image.Image:
    """Load `path` as an 8-bit RGB image (alpha composited on white, 16-bit and float scaled to 8 bits).

    Raises `DataError` naming the file if it cannot be read.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return _to_rgb(im)
    except Exception as e:  # noqa: BLE001 - any decode failure is reported as unusable data
        raise DataError(f"{path}: cannot read image: {str(e) or type(e).__name__}") from None


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
