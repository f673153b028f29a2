"""Listing a source: folder symlinks are never followed (and are reported), empty class folders and repeated CSV
rows are reported, content fingerprints change with content — and `dvc repro` reruns ingest when a listed image
changes, for a folder, a CSV listing and an s3:// prefix alike."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from components.data.listing import fingerprint, list_class_folder, list_source, read_listing_csv
from tests.conftest import git_commit_all, make_image, set_params, tiny_sample, tool_env


def test_a_symlink_to_the_source_is_not_followed_and_is_reported(tmp_path):
    raw = tmp_path / "raw"
    for label in ("cat", "dog"):
        for i in range(3):
            make_image(raw / label / f"{i}.jpg", hash(label) % 100 + i)
    (raw / "cat" / "loop").symlink_to(raw, target_is_directory=True)  # back into the source: a cycle
    (raw / "outside").symlink_to(tmp_path, target_is_directory=True)  # a class folder that leaves the source
    listing = list_class_folder(raw)
    assert sorted(s.path for s in listing.files) == sorted(str(p) for p in raw.glob("*/*.jpg"))
    assert {(Path(s["file"]).name, s["reason"].split(" (")[0]) for s in listing.skipped} == {
        ("loop", "folder symlink not followed"), ("outside", "folder symlink not followed")}


def test_empty_class_folders_are_reported(tmp_path):
    make_image(tmp_path / "raw" / "cat" / "a.jpg", 1)
    (tmp_path / "raw" / "dog" / "nested").mkdir(parents=True)
    (tmp_path / "raw" / ".cache").mkdir()
    assert list_class_folder(tmp_path / "raw").empty_classes == ["dog"]


def test_csv_rows_naming_one_file_twice_are_reported_not_duplicated(tmp_path):
    for name in ("a", "b", "c"):
        make_image(tmp_path / f"{name}.jpg", ord(name))
    (tmp_path / "list.csv").write_text("path,label\na.jpg,cat\n./a.jpg,cat\nb.jpg,cat\nc.jpg,cat\nc.jpg,dog\n")
    listing = read_listing_csv(tmp_path / "list.csv")
    assert [(Path(s.path).name, s.label) for s in listing.files] == [("a.jpg", "cat"), ("b.jpg", "cat")]
    assert listing.repeated_rows == [{"file": str(tmp_path / "a.jpg"), "lines": [2, 3]}]
    assert listing.skipped == [{"file": str(tmp_path / "c.jpg"),
                                "reason": "listed under different labels: cat (line 5), dog (line 6)"}]


def test_fingerprints_follow_content_and_never_block(tmp_path):
    make_image(tmp_path / "raw" / "cat" / "a.jpg", 1)
    os.mkfifo(tmp_path / "raw" / "cat" / "pipe")
    first = fingerprint(list_class_folder(tmp_path / "raw"))
    assert dict(zip(first["path"].map(lambda p: Path(p).name), first["content"])) == {
        "a.jpg": first["content"][0], "pipe": "not a regular file"}
    assert first["content"][0].startswith("sha256:")
    os.utime(tmp_path / "raw" / "cat" / "a.jpg", (1, 1))  # touching is not changing
    pd.testing.assert_frame_equal(first, fingerprint(list_class_folder(tmp_path / "raw")))
    make_image(tmp_path / "raw" / "cat" / "a.jpg", 2)
    assert fingerprint(list_class_folder(tmp_path / "raw"))["content"][0] != first["content"][0]


def _repro_ingest(repo: Path, env: dict[str, str]) -> str:
    done = subprocess.run(["dvc", "repro", "ingest"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _manifest(repo: Path) -> dict[str, str]:
    table = pd.read_parquet(repo / "data" / "manifest.parquet")
    return {f"{Path(u).parent.name}/{Path(u).name}": i for u, i in zip(table["uri"], table["id"])}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "csv", "s3"])
def test_dvc_reruns_ingest_when_a_listed_image_changes(kind, repo_copy, tmp_path, request):
    """The stage's inputs are the listed images themselves: changing or deleting one reruns ingest, an untouched
    source does not (before the scan stage, a CSV or an s3:// source left `dvc repro` "up to date")."""
    repo, images = repo_copy, tmp_path / "images"
    rows = tiny_sample(images, classes=3, per_class=3)
    env = tool_env(FIRESIGHT_PYTHON=sys.executable)
    first, second = Path(rows[0][0]), Path(rows[1][0])
    if kind == "folder":
        shutil.copytree(images, repo / "data" / "raw")
        source, target = "data/raw", repo / "data" / "raw" / first.parent.name
        change = lambda name, src: shutil.copy2(src, target / name)  # noqa: E731
        delete = lambda name: (target / name).unlink()  # noqa: E731
    elif kind == "csv":
        (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
        source = str(tmp_path / "list.csv")
        change = lambda name, src: shutil.copy2(src, first.parent / name)  # noqa: E731
        delete = lambda name: (first.parent / name).unlink()  # noqa: E731
    else:
        s3_env = request.getfixturevalue("s3_env")
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket="photos")
        for path, label in rows:
            client.upload_file(path, "photos", f"raw/{label}/{Path(path).name}")
        env.update(s3_env)
        source = "s3://photos/raw"
        key = f"raw/{first.parent.name}/"
        change = lambda name, src: client.upload_file(str(src), "photos", key + name)  # noqa: E731
        delete = lambda name: client.delete_object(Bucket="photos", Key=key + name)  # noqa: E731
    set_params(repo, {"ingest": {"source": source, "min_side": 16}})
    git_commit_all(repo, kind)

    assert "Running stage 'ingest'" in _repro_ingest(repo, env)
    before = _manifest(repo)
    assert len(before) == 9
    assert "Running stage 'ingest'" not in _repro_ingest(repo, env), "nothing changed: ingest must not rerun"

    change(first.name, second)  # a listed image's content changes (it becomes a copy of another: a duplicate)
    assert "Running stage 'ingest'" in _repro_ingest(repo, env)
    assert _manifest(repo) != before and len(_manifest(repo)) == 8

    delete(second.name)
    assert "Running stage 'ingest'" in _repro_ingest(repo, env)
    after = _manifest(repo)
    named = lambda p: f"{p.parent.name}/{p.name}"  # noqa: E731
    assert named(second) not in after and named(first) in after and len(after) == 8


def test_list_source_names_what_it_cannot_use(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(Exception, match="neither a folder of class folders nor a .csv listing"):
        list_source(str(tmp_path / "notes.txt"))
    with pytest.raises(Exception, match="does not exist"):
        list_source(str(tmp_path / "nope"))
