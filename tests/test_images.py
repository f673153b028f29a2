"""Decoding and probing image files: EXIF orientation, the byte and pixel caps (checked before the pixels or the
rest of the file are read), a decoder that crashes its worker process, and Ctrl+C during ingest."""

from __future__ import annotations

import io
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
from types import SimpleNamespace

import numpy as np
import pandas as pd
import psutil
import pytest
from PIL import Image

from components import storage
from components.data import images
from components.data.images import BadImage, load_rgb, probe_image
from components.data.ingest import _Probe, _probe, _probe_all, ingest
from components.data.listing import SourceFile
from components.errors import DataError
from tests.conftest import INGEST_CAPS, REPO

MiB = 2**20


def class_files(raw: Path) -> list[SourceFile]:
    """The files of `raw/<class>/<file>`, each with its class."""
    return [SourceFile(str(p), p.parent.name) for p in sorted(raw.glob("*/*"))]


def run_ingest(raw: Path, **overrides) -> tuple[pd.DataFrame, dict]:
    kwargs = dict(source=str(raw), exclude_classes=[], max_images_per_class=None, min_side=16, workers=1, seed=0,
                  progress=False, **INGEST_CAPS)
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
        load_rgb(raw / "cat" / "huge.png", max_pixels=INGEST_CAPS["max_pixels"])


def ingest_traced(raw: Path) -> tuple[dict, int]:
    """The ingest report of `raw` and the peak of Python memory allocated while making it."""
    tracemalloc.start()
    try:
        _, report = run_ingest(raw)
        return report, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_file_over_the_byte_cap_is_quarantined_unread(tmp_path: Path) -> None:
    """A sparse file twice the default cap (64 MiB): quarantined with its size and the cap, never read."""
    raw = tmp_path / "raw"
    ok_image(raw / "cat" / "ok.png")
    with open(raw / "cat" / "big.jpg", "wb") as f:
        f.truncate(128 * MiB)

    report, peak = ingest_traced(raw)
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

    report, peak = ingest_traced(raw)
    assert quarantine_reasons(report, raw)["cat/huge.png"].startswith("too many pixels: 10000x10000")
    assert peak < 4 * MiB


def crash_on_poison(path: str) -> _Probe:
    """The probe of the crash test, run in the worker processes: a file named poison* kills its worker outright
    (SIGKILL, as a segfaulting decoder or the OOM killer would); any other file is probed as ingest does."""
    if Path(path).name.startswith("poison"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _probe(path, min_side=16, max_bytes=INGEST_CAPS["max_file_bytes"], max_pixels=INGEST_CAPS["max_pixels"])


def test_a_crashed_decode_worker_quarantines_only_its_file(tmp_path: Path) -> None:
    """Ingest hands `_probe_all` its probe function; here it is `crash_on_poison`, which the forkserver's worker
    processes import from this module (no monkeypatching reaches them, no test hook in the product)."""
    paths = [str(ok_image(tmp_path / f"{'poison' if i in (3, 4) else 'ok'}{i:02d}.png")) for i in range(24)]
    results = _probe_all(paths, crash_on_poison, workers=2, progress=False)
    crashed = _Probe(None, None, 0, "decoder crashed the worker process (exit code -9, SIGKILL)")
    assert results == [crashed if "poison" in p else crash_on_poison(p) for p in paths]



INGEST_SCRIPT = """
import sys
from pathlib import Path

from components.data.ingest import ingest
from components.data.listing import SourceFile
from components.storage import write_parquet

files = [SourceFile(str(p), p.parent.name) for p in sorted(Path("raw").glob("*/*"))]
try:
    result = ingest(files, source="raw", exclude_classes=[], max_images_per_class=None, min_side=16, workers=2,
                    seed=0, max_file_bytes=2**26, max_pixels=5 * 10**7)
    write_parquet("data/manifest.parquet", result.manifest)
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
"""
N_FILES = 1500


@pytest.fixture()
def ingesting(tmp_path: Path):
    """A process ingesting `N_FILES` tiny JPEGs with 2 decode workers (in a session of its own, like a terminal's
    foreground job); yields (process, its stderr file) once it has decoded 20 files; kills what is left after."""
    data = io.BytesIO()
    Image.effect_noise((64, 48), 64).convert("RGB").save(data, format="JPEG")
    (tmp_path / "raw" / "c").mkdir(parents=True)
    for i in range(N_FILES):
        (tmp_path / "raw" / "c" / f"{i:04d}.jpg").write_bytes(data.getvalue())
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", INGEST_SCRIPT], cwd=tmp_path, stderr=err,
                                env=os.environ | {"PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not re.search(rf"decode: .*\| *([2-9]\d|\d{{3,}})/{N_FILES}", stderr.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.01)
        yield proc, stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_decode_workers_ignore_ctrl_c(ingesting, tmp_path: Path) -> None:
    """SIGINT to the worker processes alone: they must leave it to the ingesting process, which finishes."""
    proc, stderr = ingesting
    for child in psutil.Process(proc.pid).children(recursive=True):
        os.kill(child.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 0, stderr.read_text()
    assert "Traceback" not in stderr.read_text()
    assert len(pd.read_parquet(tmp_path / "data" / "manifest.parquet")) == 1  # N_FILES copies of one image


def test_ctrl_c_during_ingest_stops_promptly_without_tracebacks(ingesting, tmp_path: Path) -> None:
    """Ctrl+C in a terminal signals the whole foreground process group: the ingesting process, the forkserver
    and the decode workers. Only the ingesting process reacts: it stops within seconds and writes nothing."""
    proc, stderr = ingesting
    os.killpg(proc.pid, signal.SIGINT)
    interrupted = time.monotonic()
    proc.wait(timeout=60)
    stopped_in = time.monotonic() - interrupted
    text = stderr.read_text()
    assert proc.returncode == 130 and "Traceback" not in text, text
    assert stopped_in < 5, f"{stopped_in:.1f} s after Ctrl+C"
    assert not (tmp_path / "data").exists()


def test_a_file_that_grows_after_its_size_was_taken_is_read_no_further_than_the_cap(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """The size says 100 bytes (taken before the file grew to 64 MiB): at most cap + 1 bytes are read."""
    path = tmp_path / "growing.png"
    with open(path, "wb") as f:
        f.write(png_header(40, 30))
        f.truncate(64 * MiB)
    monkeypatch.setattr(images, "os", SimpleNamespace(stat=lambda p: os.stat_result((*os.stat(p)[:6], 100,
                                                                                     *os.stat(p)[7:]))))
    tracemalloc.start()
    try:
        with pytest.raises(BadImage, match=r"^file too large: more than ingest.max_file_bytes 1.0 MiB \(it grew"):
            probe_image(path, min_side=1, max_bytes=MiB, max_pixels=INGEST_CAPS["max_pixels"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB


def test_s3_objects_over_the_byte_cap_are_quarantined_unread(s3_env, tmp_path: Path) -> None:
    import boto3

    storage._S3_BY_PID.clear()  # an s3fs filesystem for this test's endpoint
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="raw")
    s3.put_object(Bucket="raw", Key="cat/ok.png", Body=ok_image(tmp_path / "ok.png").read_bytes())
    s3.put_object(Bucket="raw", Key="cat/big.png", Body=png_header(100, 100) + bytes(2 * MiB))
    files = [SourceFile("s3://raw/cat/big.png", "cat"), SourceFile("s3://raw/cat/ok.png", "cat")]
    try:
        result = ingest(files, source="s3://raw", exclude_classes=[], max_images_per_class=None, min_side=16,
                        workers=1, seed=0, progress=False, max_file_bytes=MiB, max_pixels=INGEST_CAPS["max_pixels"])
    finally:
        for key in ("cat/ok.png", "cat/big.png"):
            s3.delete_object(Bucket="raw", Key=key)
        s3.delete_bucket(Bucket="raw")
        storage._S3_BY_PID.clear()
    assert result.report["quarantine"] == [
        {"file": "s3://raw/cat/big.png", "reason": "file too large: 2.0 MiB > ingest.max_file_bytes 1.0 MiB"}]
    assert result.manifest[["uri", "width", "height", "bytes"]].values.tolist() == [
        ["s3://raw/cat/ok.png", 40, 30, (tmp_path / "ok.png").stat().st_size]]


def _photo(path: Path, size: tuple[int, int], fmt: str = "JPEG", exif: Image.Exif | None = None) -> Path:
    """A smooth gradient picture with some structure (what a camera's JPEG holds), saved as `fmt`."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(12 * x + 7 * y)], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path, format=fmt, quality=92,
                                                       **({"exif": exif} if exif is not None else {}))
    return path


@pytest.mark.parametrize(("side", "expected"), [(100, (125, 75)), (224, (250, 150)), (500, (500, 300)),
                                                 (501, (1000, 600)), (None, (1000, 600))])
def test_a_jpeg_is_draft_decoded_to_the_smallest_scale_that_keeps_the_side(tmp_path: Path, side, expected) -> None:
    """1000x600: 1/8 gives 125, 1/4 250, 1/2 500 on the longer side; the smallest one still >= side is decoded."""
    path = _photo(tmp_path / "big.jpg", (1000, 600))
    image = load_rgb(path, draft_side=side)
    assert image.size == expected and image.mode == "RGB"
    assert images.decode_rgb(path.read_bytes(), draft_side=side).size == expected


def test_draft_decoding_keeps_the_picture_and_its_orientation(tmp_path: Path) -> None:
    """The reduced decode, resized, is the full decode resized (within JPEG's own error); a portrait EXIF photo
    stays portrait; a PNG is always decoded whole."""
    path = _photo(tmp_path / "big.jpg", (1000, 600))
    full = np.asarray(load_rgb(path).resize((200, 120), Image.Resampling.BILINEAR), dtype=np.float64)
    draft = np.asarray(load_rgb(path, draft_side=200).resize((200, 120), Image.Resampling.BILINEAR), dtype=np.float64)
    assert np.abs(full - draft).mean() < 2.0
    exif = Image.Exif()
    exif[0x0112] = 6
    assert load_rgb(_photo(tmp_path / "portrait.jpg", (1000, 600), exif=exif), draft_side=224).size == (150, 250)
    assert load_rgb(_photo(tmp_path / "big.png", (1000, 600), fmt="PNG"), draft_side=224).size == (1000, 600)


def test_the_draft_side_is_the_largest_described_side_and_only_when_the_model_says() -> None:
    meta = {"image_size": 200, "scales": [1.0, 0.5], images.DRAFT_DECODE: True}
    assert images.decode_side(meta) == 200
    assert images.decode_side(meta, image_size=300, scales=[0.5, 1.5]) == 450
    assert images.decode_side({**meta, "object_crop": {"threshold": 0.3, "margin": 0.1}}) is None  # crops need pixels
    assert images.decode_side(meta, object_cropped=True) is None
    assert images.decode_side({"image_size": 200}) is None  # older models: a full decode, as their indexes were made
