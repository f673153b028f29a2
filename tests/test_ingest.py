"""Ingest: listing, decode-by-content validation, duplicates, leaks, exclusion, cap, and the accounting invariant."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.data.images import BadImage, load_rgb, probe_image
from components.data.ingest import MANIFEST_COLUMNS, ingest
from components.data.listing import SourceFile, list_class_folder, read_listing_csv
from components.errors import DataError
from components.storage import atomic_write_path, write_json
from tests.conftest import INGEST_CAPS, REPO, make_image, params_with


def build_dataset(root: Path) -> None:
    """The fixture tree: every kind of good and bad input, see EXPECTED_* below."""
    make_image(root / "cat" / "a.jpg", 1)
    (root / "cat" / "a_copy.jpg").write_bytes((root / "cat" / "a.jpg").read_bytes())
    make_image(root / "cat" / "b.png", 2, fmt="PNG")
    make_image(root / "cat" / "noext", 3)
    make_image(root / "cat" / ".hidden.jpg", 4)
    make_image(root / "cat" / "sub" / "deep.jpg", 5)
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "notes.jpg").write_text("not an image at all\n")
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    data = make_image(root / "cat" / "trunc.jpg", 6, size=(96, 96)).read_bytes()
    (root / "cat" / "trunc.jpg").write_bytes(data[: len(data) * 6 // 10])
    make_image(root / "cat" / "small.jpg", 7, size=(20, 15))
    make_image(root / "cat" / "shared.jpg", 8)
    (root / "dog" / "shared_too.jpg").parent.mkdir(parents=True, exist_ok=True)
    (root / "dog" / "shared_too.jpg").write_bytes((root / "cat" / "shared.jpg").read_bytes())
    for i in range(3):
        make_image(root / "dog" / f"d{i}.jpg", 10 + i)
    for i in range(2):
        make_image(root / "bird" / f"b{i}.jpg", 20 + i)
    make_image(root / "stray.jpg", 30)


EXPECTED_KEPT = {
    "cat/a.jpg": ("cat", "JPEG"),
    "cat/b.png": ("cat", "PNG"),
    "cat/noext": ("cat", "JPEG"),
    "cat/.hidden.jpg": ("cat", "JPEG"),
    "cat/sub/deep.jpg": ("cat", "JPEG"),
    "dog/d0.jpg": ("dog", "JPEG"),
    "dog/d1.jpg": ("dog", "JPEG"),
    "dog/d2.jpg": ("dog", "JPEG"),
}
EXPECTED_QUARANTINE = {
    "cat/empty.jpg": "empty file",
    "cat/notes.jpg": "not an image (cannot identify format)",
    "cat/.DS_Store": "not an image (cannot identify format)",
    "cat/small.jpg": "too small: 20x15 < min side 32",
    "stray.jpg": "not inside a class folder",
}


def run_ingest(files: list[SourceFile], **overrides) -> tuple[pd.DataFrame, dict]:
    kwargs = dict(source="raw", exclude_classes=["bird"], max_images_per_class=None, min_side=32, workers=1,
                  seed=0, progress=False, **INGEST_CAPS)
    result = ingest(files, **(kwargs | overrides))
    return result.manifest, result.report


def accounted_files(manifest: pd.DataFrame, report: dict, files: list[SourceFile], excluded: set[str]) -> list[str]:
    """Every file the result accounts for, one entry per accounting (excluded classes from their listing)."""
    out = list(manifest["uri"])
    out += [q["file"] for q in report["quarantine"]]
    out += [f for d in report["duplicates"] for f in d["dropped"]]
    out += [f["file"] for leak in report["leaks"] for f in leak["files"]]
    out += [f for c in report["over_cap"].values() for f in c["left_out"]]
    out += [s.path for s in files if s.label in excluded]
    assert sum(report["excluded_classes"].values()) == sum(s.label in excluded for s in files)
    return out


def rel(path: str, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    build_dataset(tmp_path / "raw")
    return tmp_path / "raw"


def test_list_class_folder_keeps_relative_paths_sorted_and_hidden(raw: Path, monkeypatch) -> None:
    monkeypatch.chdir(raw.parent)
    files = list_class_folder(Path("raw")).files
    paths = [s.path for s in files]
    assert paths == sorted(paths) and all(p.startswith("raw/") for p in paths)
    assert SourceFile("raw/cat/.DS_Store", "cat") in files
    assert SourceFile("raw/cat/sub/deep.jpg", "cat") in files
    assert SourceFile("raw/stray.jpg", None) in files
    assert len(files) == 19


def test_ingest_manifest_and_report(raw: Path) -> None:
    files = list_class_folder(raw).files
    manifest, report = run_ingest(files)

    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert manifest["id"].is_unique and manifest["id"].str.fullmatch("[0-9a-f]{64}").all()
    kept = {rel(u, raw): (label, fmt) for u, label, fmt in zip(manifest["uri"], manifest["label"], manifest["format"])}
    assert kept == EXPECTED_KEPT
    assert (manifest[["width", "height"]].to_numpy() == [64, 48]).all()
    assert (manifest["bytes"] == [os.path.getsize(u) for u in manifest["uri"]]).all()

    reasons = {rel(q["file"], raw): q["reason"] for q in report["quarantine"]}
    assert reasons.pop("cat/trunc.jpg").startswith("truncated or corrupt: ")
    assert reasons == EXPECTED_QUARANTINE
    assert [(d["label"], rel(d["kept"], raw), [rel(f, raw) for f in d["dropped"]]) for d in report["duplicates"]] == [
        ("cat", "cat/a.jpg", ["cat/a_copy.jpg"])
    ]
    assert len(report["leaks"]) == 1
    assert {(rel(f["file"], raw), f["label"]) for f in report["leaks"][0]["files"]} == {
        ("cat/shared.jpg", "cat"), ("dog/shared_too.jpg", "dog")
    }
    assert report["excluded_classes"] == {"bird": 2}
    assert report["over_cap"] == {}
    assert report["per_class"] == {"cat": 5, "dog": 3}
    assert (report["files_seen"], report["images_kept"], report["classes"]) == (19, 8, 2)


def test_every_file_is_accounted_for_exactly_once(raw: Path) -> None:
    files = list_class_folder(raw).files
    for cap in (None, 2):
        manifest, report = run_ingest(files, max_images_per_class=cap)
        accounted = accounted_files(manifest, report, files, {"bird"})
        assert len(accounted) == report["files_seen"] == len(files)
        assert sorted(accounted) == sorted(s.path for s in files)


def test_parallel_decode_matches_in_process(raw: Path) -> None:
    files = list_class_folder(raw).files
    serial = run_ingest(files)
    parallel = run_ingest(files, workers=2)
    pd.testing.assert_frame_equal(serial[0], parallel[0])
    assert serial[1] == parallel[1]


def test_cap_is_a_seeded_deterministic_subset(tmp_path: Path) -> None:
    for i in range(10):
        make_image(tmp_path / "raw" / "many" / f"{i:02d}.jpg", 100 + i, size=(32, 32))
    make_image(tmp_path / "raw" / "few" / "x.jpg", 200, size=(32, 32))
    files = list_class_folder(tmp_path / "raw").files

    first, report = run_ingest(files, max_images_per_class=4)
    again, _ = run_ingest(list(reversed(files)), max_images_per_class=4)
    other, _ = run_ingest(files, max_images_per_class=4, seed=1)

    pd.testing.assert_frame_equal(first, again)
    assert set(first["uri"]) != set(other["uri"])
    assert report["per_class"] == {"few": 1, "many": 4}
    capped = report["over_cap"]["many"]
    assert capped["kept"] == 4 and len(capped["left_out"]) == 6
    assert set(capped["left_out"]).isdisjoint(first["uri"])
    assert "few" not in report["over_cap"]


def test_csv_listing_resolves_relative_paths_and_reports_missing_files(raw: Path) -> None:
    listing = raw.parent / "listing.csv"
    listing.write_text(
        "path,label\n"
        "raw/cat/a.jpg,cat\n"
        f"{raw / 'dog' / 'd0.jpg'}, dog\n"
        "raw/cat/noext,cat\n"
        "\n"
        "raw/dog/gone.jpg,dog\n"
    )
    files = read_listing_csv(listing).files
    assert files[0] == SourceFile(str(raw / "cat" / "a.jpg"), "cat")
    assert files[1] == SourceFile(str(raw / "dog" / "d0.jpg"), "dog")

    manifest, report = run_ingest(files, source=str(listing))
    assert sorted(rel(u, raw) for u in manifest["uri"]) == ["cat/a.jpg", "cat/noext", "dog/d0.jpg"]
    assert report["quarantine"] == [{"file": str(raw / "dog" / "gone.jpg"), "reason": "missing file"}]
    assert report["files_seen"] == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,label\na.jpg,cat\n", r"listing\.csv:1: missing column\(s\) path"),
        ("path,label\na.jpg,cat\nb.jpg,\n", r"listing\.csv:3: empty label"),
        ("path,label\na.jpg,cat,extra\n", r"listing\.csv:2: expected 2 fields"),
        ("", r"listing\.csv:1: missing column\(s\) path, label"),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "listing.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        read_listing_csv(tmp_path / "listing.csv")


def test_nothing_usable_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "raw" / "cat").mkdir(parents=True)
    (tmp_path / "raw" / "cat" / "x.jpg").write_text("text")
    with pytest.raises(DataError, match=r"no usable images in raw: 1 files seen, 1 quarantined.*not an image"):
        run_ingest(list_class_folder(tmp_path / "raw").files)


def test_decompression_bomb_is_quarantined(tmp_path: Path, monkeypatch) -> None:
    path = make_image(tmp_path / "raw" / "cat" / "big.jpg", 1)
    make_image(tmp_path / "raw" / "cat" / "ok.jpg", 2, size=(16, 16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImage, match="too large"):
        probe_image(path, min_side=1, max_bytes=INGEST_CAPS["max_file_bytes"], max_pixels=INGEST_CAPS["max_pixels"])
    _, report = run_ingest(list_class_folder(tmp_path / "raw").files, min_side=1)
    assert [q["reason"].split(" (")[0] for q in report["quarantine"]] == ["too large"]


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("LA", (40, 40), (0, 0)), "PNG", (255, 255, 255)),
        (Image.new("RGBA", (40, 40), (10, 20, 30, 255)), "PNG", (10, 20, 30)),
        (Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)), "PNG", (255, 255, 255)),
        (Image.new("CMYK", (40, 40), (0, 0, 0, 0)), "JPEG", (255, 255, 255)),
        (Image.new("L", (40, 40), 7), "PNG", (7, 7, 7)),
    ],
)
def test_load_rgb_converts_any_mode(tmp_path: Path, image: Image.Image, fmt: str, expected: tuple) -> None:
    path = tmp_path / "img"
    image.save(path, format=fmt)
    assert probe_image(path, min_side=32, max_bytes=INGEST_CAPS["max_file_bytes"], max_pixels=INGEST_CAPS["max_pixels"])[1].format == fmt
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (40, 40)
    assert all(abs(a - b) <= 2 for a, b in zip(rgb.getpixel((5, 5)), expected))


def test_load_rgb_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (40, 40), 1)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    image.save(tmp_path / "p.png", transparency=1)
    assert load_rgb(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)


def test_load_rgb_names_the_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_text("text")
    with pytest.raises(DataError, match=r"x\.jpg: cannot read image"):
        load_rgb(tmp_path / "x.jpg")


def test_atomic_write_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out" / "a.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_write_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(target.parent) == ["a.json"]




def run_module(module: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(
    ("ingest_section", "message"),
    [
        ({"sourc": "raw"}, "ingest.sourc: unknown key"),
        ({"source": "nowhere"}, "ingest.source: nowhere does not exist"),
    ],
)
def test_ingest_stage_bad_params_exit_2_without_traceback(tmp_path: Path, ingest_section: dict, message: str) -> None:
    (tmp_path / "params.yaml").write_text(params_with({"ingest": ingest_section}))
    proc = run_module("pipelines.scan", tmp_path)  # the first stage: it lists the source
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()
