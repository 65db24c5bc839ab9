"""Validation of roots and manifests: each bad input is reported, counted and refusable."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from saft.data.adapters import AdapterError, UnknownDatasetError, get_adapter
from saft.data.imagefolder import ImageEntry, scan_image_folder
from saft.data.manifest import ManifestEntry, hash_entries
from saft.data.validate import (
    DataValidationError,
    ValidationReport,
    class_keys,
    image_problem,
    skip_corrupt,
    validate_dataset,
    validate_root,
)
from test_data_prepare import MISSILES, write_distinct_image, write_split_json_tree

CLASSES = ["ant", "bee", "cat", "dog"]


def kinds(report: ValidationReport) -> dict[str, list[str]]:
    return {kind: [f.subject for f in found] for kind, found in report.by_kind().items()}


def test_clean_tree_is_ok(image_tree: Path) -> None:
    report = validate_root(image_tree, expected_classes=CLASSES)
    assert report.ok and report.findings == []
    assert report.files_checked == 24 and report.classes == tuple(CLASSES)
    assert "24 file(s), 4 class(es): OK" in report.format()
    report.raise_if_failed()


def test_broken_files_are_each_reported(image_tree: Path, make_image) -> None:
    good_jpeg = make_image(image_tree / "ant" / "big.jpg", 500, size=(32, 32)).read_bytes()
    (image_tree / "ant" / "big.jpg").unlink()
    (image_tree / "ant" / "corrupt.jpg").write_bytes(good_jpeg[:30] + b"\x00garbage" * 20)
    (image_tree / "bee" / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (image_tree / "cat" / "empty.png").write_bytes(b"")
    report = validate_root(image_tree, expected_classes=CLASSES)
    assert not report.ok
    assert kinds(report) == {
        "zero_byte": ["cat/empty.png"],
        "corrupt": ["ant/corrupt.jpg", "bee/truncated.jpg"],
    }
    details = {f.subject: f.detail for f in report.findings}
    assert "not a recognised image format" in details["ant/corrupt.jpg"]
    assert "truncated" in details["bee/truncated.jpg"].lower() or "Truncated" in details["bee/truncated.jpg"]
    text = report.format()
    assert "FAILED (3 error(s), 0 warning(s))" in text
    assert "error corrupt: 2 file(s) Pillow cannot decode" in text and "bee/truncated.jpg" in text
    assert "error zero_byte: 1 empty (zero-byte) file(s)" in text
    with pytest.raises(DataValidationError, match="cat/empty.png") as caught:
        report.raise_if_failed()
    assert caught.value.report is report


def test_truncated_png_is_corrupt(make_image, tmp_path: Path) -> None:
    data = make_image(tmp_path / "x.png", 1, size=(32, 32)).read_bytes()
    assert image_problem(data) is None
    assert "truncated" in (image_problem(data[: len(data) // 2]) or "")


def test_class_problems(image_tree: Path) -> None:
    (image_tree / "emu").mkdir()
    (image_tree / "emu" / "readme.txt").write_text("no images here")
    shutil.rmtree(image_tree / "dog")
    report = validate_root(image_tree, expected_classes=CLASSES + ["emu"])
    assert kinds(report) == {"missing_class": ["dog"], "empty_class": ["emu"]}
    report = validate_root(image_tree, expected_classes=["ant", "bee", "cat"])
    assert kinds(report) == {"extra_class": ["emu"], "empty_class": ["emu"]}
    assert "error extra_class: 1 class(es) not in the expected class list" in report.format()


def test_symlink_out_of_root_in_scan(image_tree: Path, make_image, tmp_path: Path) -> None:
    outside = make_image(tmp_path / "elsewhere" / "x.png", 77)
    (image_tree / "ant" / "escape.png").symlink_to(outside)
    report = validate_root(image_tree)
    assert kinds(report) == {"unsafe_path": ["ant/escape.png"]}
    assert "outside the dataset root" in report.findings[0].detail


def test_symlinked_class_folder_out_of_root(image_tree: Path, make_image, tmp_path: Path) -> None:
    make_image(tmp_path / "shared" / "emu" / "a.png", 61)
    make_image(tmp_path / "shared" / "emu" / "b.png", 62)
    (image_tree / "emu").symlink_to(tmp_path / "shared" / "emu", target_is_directory=True)
    (image_tree / "ant" / "loop").symlink_to(image_tree, target_is_directory=True)  # must not recurse forever
    report = validate_root(image_tree)
    assert kinds(report) == {"unsafe_path": ["emu/a.png", "emu/b.png"]}
    assert report.classes == ("ant", "bee", "cat", "dog", "emu")


def test_manifest_entries_that_escape(image_tree: Path, make_image, tmp_path: Path) -> None:
    outside = make_image(tmp_path / "outside.png", 88)
    (image_tree / "bee" / "link.png").symlink_to(outside)
    entries = [
        ImageEntry("ant/img00.png", 0, "ant"),
        ImageEntry("../outside.png", 0, "ant"),
        ImageEntry(str(outside), 1, "bee"),
        ImageEntry("bee/link.png", 1, "bee"),
        ImageEntry("bee/never-was.png", 1, "bee"),
    ]
    report = validate_root(image_tree, entries)
    assert kinds(report) == {
        "unsafe_path": sorted(["../outside.png", str(outside), "bee/link.png"]),
        "missing_file": ["bee/never-was.png"],
    }
    assert report.bad_paths() == {"../outside.png", str(outside), "bee/link.png", "bee/never-was.png"}
    assert report.files_checked == 5


def test_manifest_mode_checks_hashes_and_classes(image_tree: Path) -> None:
    entries = hash_entries(image_tree, scan_image_folder(image_tree).entries)
    assert validate_root(image_tree, entries, expected_classes=CLASSES).ok
    (image_tree / "ant" / "img00.png").write_bytes((image_tree / "ant" / "img02.png").read_bytes())
    only_three = [e for e in entries if e.class_name != "dog"]
    report = validate_root(image_tree, only_three, expected_classes=CLASSES)
    found = kinds(report)
    assert found["hash_mismatch"] == ["ant/img00.png"]
    assert found["missing_class"] == ["dog"]
    assert found["duplicate"] == ["ant/img02.png"]


def test_duplicates(image_tree: Path) -> None:
    shutil.copy(image_tree / "ant" / "img00.png", image_tree / "ant" / "copy.png")
    report = validate_root(image_tree)
    assert report.ok  # a repeat within a class is a warning
    assert kinds(report) == {"duplicate": ["ant/img00.png"]}  # the later path in sorted order
    assert "warning duplicate: 1" in report.format()
    shutil.copy(image_tree / "bee" / "img01.jpg", image_tree / "cat" / "same-as-bee.jpg")
    report = validate_root(image_tree)
    assert not report.ok
    assert kinds(report)["conflicting_duplicate"] == ["cat/same-as-bee.jpg"]
    assert "class 'bee'" in report.by_kind()["conflicting_duplicate"][0].detail


def test_format_caps_examples(image_tree: Path) -> None:
    for i in range(8):
        (image_tree / "ant" / f"zero{i}.png").write_bytes(b"")
    text = validate_root(image_tree).format(max_examples=3)
    assert "error zero_byte: 8 empty" in text and "... and 5 more" in text
    assert text.count("ant/zero") == 3


def test_skip_corrupt_drops_files_and_logs(image_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    (image_tree / "ant" / "empty.png").write_bytes(b"")
    (image_tree / "bee" / "bad.jpg").write_bytes(b"not a jpeg at all")
    entries = list(scan_image_folder(image_tree).entries)
    report = validate_root(image_tree, entries)
    with caplog.at_level(logging.WARNING, logger="saft.data.validate"):
        kept = skip_corrupt(entries, report)
    assert len(entries) == 26 and len(kept) == 24
    assert {e.path for e in entries} - {e.path for e in kept} == {"ant/empty.png", "bee/bad.jpg"}
    assert "skipped 2 of 26 entries" in caplog.text and "zero_byte: 1" in caplog.text and "corrupt: 1" in caplog.text


def test_skip_corrupt_never_drops_a_class(image_tree: Path) -> None:
    entries = [ImageEntry("ant/img00.png", 0, "ant"), ImageEntry("bee/broken.png", 1, "bee")]
    (image_tree / "bee" / "broken.png").write_bytes(b"\x89PNG broken")
    report = validate_root(image_tree, entries)
    with pytest.raises(DataValidationError, match="leave class\\(es\\) 'bee' with no image"):
        skip_corrupt(entries, report)


def test_skip_corrupt_refuses_class_problems(image_tree: Path) -> None:
    (image_tree / "emu").mkdir()
    entries = list(scan_image_folder(image_tree).entries)
    report = validate_root(image_tree)
    assert kinds(report) == {"empty_class": ["emu"]}
    with pytest.raises(DataValidationError, match="fix these class problems"):
        skip_corrupt(entries, report)


def test_s3_root_validation(s3_bucket, image_tree: Path, upload) -> None:
    client, bucket = s3_bucket
    (image_tree / "cat" / "empty.png").write_bytes(b"")
    upload(client, bucket, image_tree, "tree")
    client.put_object(Bucket=bucket, Key="tree/dog/trunc.jpg", Body=(image_tree / "dog" / "img01.jpg").read_bytes()[:100])
    report = validate_root(f"s3://{bucket}/tree", expected_classes=CLASSES)
    assert kinds(report) == {"zero_byte": ["cat/empty.png"], "corrupt": ["dog/trunc.jpg"]}
    good = [e for e in hash_entries(image_tree, scan_image_folder(image_tree).entries) if e.path != "cat/empty.png"]
    tampered = [ManifestEntry(e.path, e.label, e.class_name, "0" * 64) if e.path == "ant/img00.png" else e for e in good]
    report = validate_root(f"s3://{bucket}/tree", tampered)
    assert kinds(report) == {"hash_mismatch": ["ant/img00.png"]}
    assert f"s3://{bucket}/tree/ant/img00.png" in report.findings[0].detail
    # A one-time scan streams the objects: nothing lands in the blob cache.
    assert not Path(os.environ["SAFT_CACHE_DIR"]).exists() or not any(Path(os.environ["SAFT_CACHE_DIR"]).rglob("*"))


# --- one split of a named dataset --------------------------------------------------------


def test_imagefolder_dataset_check_is_the_root_check(image_tree: Path) -> None:
    (image_tree / "emu").mkdir()
    (image_tree / "bee" / "bad.jpg").write_bytes(b"not a jpeg at all")
    check = validate_dataset(image_tree)
    assert (check.dataset, check.split) == ("imagefolder", "all")
    assert check.classes == check.keys == tuple(CLASSES + ["emu"])
    assert kinds(check.report) == {"empty_class": ["emu"], "corrupt": ["bee/bad.jpg"]}
    assert check.report.findings == validate_root(image_tree).findings
    assert [e.path for e in check.entries] == [e.path for e in scan_image_folder(image_tree).entries]


def test_split_json_check_reads_only_the_split(tmp_path: Path) -> None:
    root = write_split_json_tree(tmp_path / "dtd", get_adapter("dtd"))
    (root / "images" / "american_bulldog" / "american_bulldog_4.jpg").write_bytes(b"")  # a test image
    train = validate_dataset(root, "dtd")
    assert train.split == "train" and train.report.ok and train.report.files_checked == 9
    assert train.classes == ("abyssinian", "american bulldog", "yorkshire terrier")
    test = validate_dataset(root, "dtd", "test")
    assert test.report.files_checked == 3
    assert kinds(test.report) == {"zero_byte": ["images/american_bulldog/american_bulldog_4.jpg"]}


def test_a_class_without_images_in_the_split_is_missing(tmp_path: Path) -> None:
    root = write_split_json_tree(tmp_path / "eurosat", get_adapter("eurosat"))
    split_file = root / "split_zhou_EuroSAT.json"
    records = json.loads(split_file.read_text())
    records["val"] = [r for r in records["val"] if r[1] != 2]
    split_file.write_text(json.dumps(records))
    report = validate_dataset(root, "eurosat", "val").report
    assert kinds(report) == {"missing_class": ["yorkshire terrier"]}


def test_repeated_class_names_stay_distinct(tmp_path: Path) -> None:
    assert class_keys(["a", "b", "a"]) == ("a (label 0)", "b", "a (label 2)")
    assert class_keys(["a", "b", "a"], ["x1", "x2", "x3"]) == ("a (x1)", "b", "a (x3)")
    assert class_keys(["a", "b"]) == ("a", "b")
    # The same bytes under ImageNet's two "missile" classes are two classes sharing an image.
    root = tmp_path / "images"
    first = write_distinct_image(root / "val" / MISSILES[0] / "a.png", 1)
    (root / "val" / MISSILES[1]).mkdir(parents=True)
    shutil.copy(first, root / "val" / MISSILES[1] / "b.png")
    check = validate_dataset(root, "imagenet", "val")
    assert check.classes[657] == check.classes[744] == "missile"
    assert check.keys[657] == f"missile ({MISSILES[0]})" and check.keys[744] == f"missile ({MISSILES[1]})"
    assert kinds(check.report)["conflicting_duplicate"] == [f"val/{MISSILES[1]}/b.png"]
    assert check.report.count("missing_class") == 998


def test_subset_datasets_expect_only_their_classes(tmp_path: Path) -> None:
    write_distinct_image(tmp_path / "a" / "n01498041" / "x.png", 3)  # stingray, label 6
    check = validate_dataset(tmp_path / "a", "imagenet-a")
    assert check.split == "test" and len(check.expected) == 200 and len(check.classes) == 1000
    assert [(e.label, e.class_name) for e in check.entries] == [(6, "stingray")]
    assert check.report.count("missing_class") == 199 and "stingray" not in kinds(check.report)["missing_class"]


def test_unknown_dataset_or_split(image_tree: Path) -> None:
    with pytest.raises(UnknownDatasetError, match="unknown dataset 'coco'; known datasets: caltech101"):
        validate_dataset(image_tree, "coco")
    with pytest.raises(AdapterError, match="dataset 'imagenet-v2' has no split 'train'; its splits: test"):
        validate_dataset(image_tree, "imagenet-v2", "train")
