"""The ImageFolder adapter: classes from sorted folder names, image files only."""

from __future__ import annotations

from pathlib import Path

from saft.data.imagefolder import ImageEntry, is_image_path, scan_image_folder


def test_classes_labels_and_order(image_tree: Path) -> None:
    index = scan_image_folder(image_tree)
    assert index.classes == ("ant", "bee", "cat", "dog")
    assert len(index.entries) == 24
    assert [e.path for e in index.entries] == sorted(e.path for e in index.entries)
    assert index.entries[0] == ImageEntry(path="ant/img00.png", label=0, class_name="ant")
    assert {e.label for e in index.entries if e.class_name == "dog"} == {3}
    assert index.counts() == {"ant": 6, "bee": 6, "cat": 6, "dog": 6}


def test_filters_and_nesting(image_tree: Path, make_image) -> None:
    (image_tree / "README.txt").write_text("top-level files are not samples")
    (image_tree / "ant" / "notes.txt").write_text("not an image")
    (image_tree / "ant" / ".DS_Store").write_bytes(b"\0")
    make_image(image_tree / ".cache" / "x.png", 99)
    make_image(image_tree / "ant" / "sub" / "deep.PNG", 100)
    make_image(image_tree / "ant" / "pic.webp", 101, fmt="WEBP")
    make_image(image_tree / "ant" / "pic.bmp", 102)
    make_image(image_tree / "ant" / "pic.JPEG", 103, fmt="JPEG")
    (image_tree / "Zebra").mkdir()
    index = scan_image_folder(image_tree)
    assert index.classes == ("Zebra", "ant", "bee", "cat", "dog")  # code-point order
    ant = sorted(e.path for e in index.entries if e.class_name == "ant")
    assert "ant/sub/deep.PNG" in ant and "ant/pic.webp" in ant and "ant/pic.bmp" in ant and "ant/pic.JPEG" in ant
    assert "ant/notes.txt" not in ant and not any(".DS_Store" in p or ".cache" in p for p in ant)
    assert index.counts()["Zebra"] == 0
    assert {e.label for e in index.entries if e.class_name == "ant"} == {1}


def test_is_image_path() -> None:
    assert is_image_path("a/b.JpG") and is_image_path("x.webp")
    assert not is_image_path("a/b.gif") and not is_image_path("a/jpg")


def test_s3_scan_matches_local(s3_bucket, image_tree: Path, upload) -> None:
    client, bucket = s3_bucket
    upload(client, bucket, image_tree, "tree")
    remote = scan_image_folder(f"s3://{bucket}/tree")
    local = scan_image_folder(image_tree)
    assert remote.classes == local.classes
    assert remote.entries == local.entries
    assert remote.root == f"s3://{bucket}/tree"
