"""Decoding and probing image files: EXIF orientation, the byte and pixel caps (checked before the pixels or the
rest of the file are read), a decoder that crashes its worker process, and Ctrl+C during ingest."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from components.data.images import load_rgb
from components.data.ingest import ingest
from components.data.listing import SourceFile
from components.errors import DataError

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def class_files(raw: Path) -> list[SourceFile]:
    """The files of `raw/<class>/<file>`, each with its class."""
    return [SourceFile(str(p), p.parent.name) for p in sorted(raw.glob("*/*"))]


def run_ingest(raw: Path, **overrides) -> tuple[pd.DataFrame, dict]:
    kwargs = dict(source=str(raw), exclude_classes=[], max_images_per_class=None, min_side=16, workers=1, seed=0,
                  progress=False)
    result = ingest(class_files(raw), **(kwargs | overrides))
    return result.manifest, result.report


def quarantine_reasons(report: dict, raw: Path) -> dict[str, str]:
    return {Path(q["file"]).relative_to(raw).as_posix(): q["reason"] for q in report["quarantine"]}


def png_header(width: int, height: int) -> bytes:
    """The start of a PNG (8-bit RGB) claiming `width` x `height`: its IHDR chunk, then an IDAT chunk of 16 zero
    bytes (not even valid compressed data) where the pixels would begin."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + struct.pack(">I", 16) + b"IDAT" + bytes(16))


def ok_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(path, format="PNG")
    return path


def test_exif_orientation_is_applied_in_the_manifest_and_when_loading(tmp_path: Path) -> None:
    """A portrait phone photo: 120x80 stored pixels, EXIF orientation 6 (rotate 90° clockwise to display)."""
    stored = Image.new("RGB", (120, 80), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # the stored top-left corner is red
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "raw" / "cat" / "portrait.jpg"
    path.parent.mkdir(parents=True)
    stored.save(path, format="JPEG", exif=exif, quality=95)

    manifest, _ = run_ingest(tmp_path / "raw")
    assert manifest[["width", "height"]].values.tolist() == [[80, 120]]

    upright = load_rgb(path)
    assert upright.size == (80, 120)
    # rotating 90° clockwise takes the stored top-left corner to the top-right
    red, blue = upright.getpixel((70, 10)), upright.getpixel((10, 10))
    assert red[0] > 200 and red[2] < 60 and blue[2] > 200 and blue[0] < 60


def test_too_many_pixels_is_refused_from_the_header(tmp_path: Path) -> None:
    """A 10000x10000 PNG header and no pixel data: the count is refused before any pixel is decoded (loading
    would say "truncated"), at ingest (quarantine) and when loading for training (a DataError naming it)."""
    raw = tmp_path / "raw"
    ok_image(raw / "cat" / "ok.png")
    (raw / "cat" / "huge.png").write_bytes(png_header(10_000, 10_000))
    reason = "too many pixels: 10000x10000 = 100.0 MP > ingest.max_pixels 50.0 MP"

    manifest, report = run_ingest(raw)
    assert quarantine_reasons(report, raw) == {"cat/huge.png": reason}
    assert list(manifest["uri"]) == [str(raw / "cat" / "ok.png")]
    with pytest.raises(DataError, match=re.escape(f"huge.png: cannot read image: {reason}")):
        load_rgb(raw / "cat" / "huge.png")


def test_a_file_over_the_byte_cap_is_quarantined_unread(tmp_path: Path) -> None:
    """A sparse file twice the default cap (64 MiB): quarantined with its size and the cap, never read."""
    raw = tmp_path / "raw"
    ok_image(raw / "cat" / "ok.png")
    with open(raw / "cat" / "big.jpg", "wb") as f:
        f.truncate(128 * MiB)

    tracemalloc.start()
    try:
        _, report = run_ingest(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert quarantine_reasons(report, raw) == {
        "cat/big.jpg": "file too large: 128.0 MiB > ingest.max_file_bytes 64.0 MiB"}
    assert peak < 4 * MiB


def test_the_header_is_checked_before_the_rest_of_the_file_is_read(tmp_path: Path) -> None:
    """A 10000x10000 PNG header followed by 20 MiB (under the byte cap): refused after reading its head only."""
    raw = tmp_path / "raw"
    ok_image(raw / "cat" / "ok.png")
    with open(raw / "cat" / "huge.png", "wb") as f:
        f.write(png_header(10_000, 10_000))
        f.truncate(20 * MiB)

    tracemalloc.start()
    try:
        _, report = run_ingest(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert quarantine_reasons(report, raw)["cat/huge.png"].startswith("too many pixels: 10000x10000")
    assert peak < 4 * MiB
