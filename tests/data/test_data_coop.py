"""The CoOp-benchmark datasets: split_zhou JSON files and FGVC-Aircraft's text lists.

Each fixture tree uses the dataset's real file names (split file, image folder) with a few
made-up classes, so the tests pin down where each adapter looks and how it labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from coop_trees import SPLIT_JSON_SETS

from saft.data.adapters import AdapterError, LayoutError, get_adapter
from saft.data.imagefolder import ImageEntry

# Records as the split files write them: [path under the image folder, label, class name].
SPLIT = {
    "train": [
        ["wild_cat/image_0002.jpg", 1, "wild_cat"],
        ["accordion/image_0001.jpg", 0, "accordion"],
        ["yin_yang/image_0003.jpg", 2, "yin_yang"],
    ],
    "val": [["accordion/image_0004.jpg", 0, "accordion"]],
    "test": [["yin_yang/image_0005.jpg", 2, "yin_yang"], ["wild_cat/image_0006.jpg", 1, "wild_cat"]],
}


def _write_split_set(root: Path, split_file: str, image_dir: str, make_image, split: dict | None = None) -> Path:
    split = SPLIT if split is None else split
    root.mkdir(parents=True, exist_ok=True)
    (root / split_file).write_text(json.dumps(split))
    seed = 0
    for records in split.values():
        for path, _, _ in records:
            make_image(root / image_dir / path if image_dir else root / path, seed, fmt="JPEG")
            seed += 1
    return root


@pytest.mark.parametrize("name", sorted(SPLIT_JSON_SETS))
def test_split_json_sets(tmp_path: Path, make_image, name: str) -> None:
    split_file, image_dir, template = SPLIT_JSON_SETS[name]
    root = _write_split_set(tmp_path / name, split_file, image_dir, make_image)
    adapter = get_adapter(name)
    assert adapter.spec.layout == "split-json" and not adapter.eval_only
    adapter.check_trainable()
    assert adapter.templates == [template]
    assert adapter.imagenet_subset is None and not adapter.has_fixed_classes
    prefix = f"{image_dir}/" if image_dir else ""

    train = adapter.scan(root, "train")
    assert train.classes == ("accordion", "wild cat", "yin yang")  # underscores become spaces
    assert train.entries == (
        ImageEntry(f"{prefix}accordion/image_0001.jpg", 0, "accordion"),
        ImageEntry(f"{prefix}wild_cat/image_0002.jpg", 1, "wild cat"),
        ImageEntry(f"{prefix}yin_yang/image_0003.jpg", 2, "yin yang"),
    )
    assert adapter.scan(root).entries == train.entries
    assert [e.path for e in adapter.scan(root, "val").entries] == [f"{prefix}accordion/image_0004.jpg"]
    assert [(e.label, e.class_name) for e in adapter.scan(root, "test").entries] == [(1, "wild cat"), (2, "yin yang")]
    assert adapter.class_names(root) == ["accordion", "wild cat", "yin yang"]
    for entry in train.entries:  # every path is relative to the root and exists there
        assert (root / entry.path).is_file()


def test_class_list_comes_from_all_splits(tmp_path: Path, make_image) -> None:
    # Label 3 appears only in the test split; the train scan must still know all 4 classes.
    split = {
        "train": [["a/1.jpg", 0, "a"], ["b/2.jpg", 1, "b"], ["c/3.jpg", 2, "c"]],
        "val": [],
        "test": [["d/4.jpg", 3, "Annual Crop Land"]],
    }
    root = _write_split_set(tmp_path / "eurosat", "split_zhou_EuroSAT.json", "2750", make_image, split)
    index = get_adapter("eurosat").scan(root, "train")
    assert index.classes == ("a", "b", "c", "Annual Crop Land")
    assert len(index.entries) == 3


def test_missing_split_file_and_images(tmp_path: Path, make_image) -> None:
    root = tmp_path / "oxford_pets"
    (root / "images").mkdir(parents=True)
    no_split = r"split_zhou_OxfordPets\.json does not exist.*Expected layout: <root>/split_zhou_OxfordPets\.json"
    with pytest.raises(LayoutError, match=no_split):
        get_adapter("oxford_pets").scan(root)
    _write_split_set(root, "split_zhou_OxfordPets.json", "images", make_image)
    (root / "images" / "wild_cat" / "image_0002.jpg").unlink()
    missing = r"1 image\(s\) named by split_zhou_OxfordPets\.json \(split 'train'\) are missing.*'images/wild_cat/image_0002\.jpg'"
    with pytest.raises(LayoutError, match=missing):
        get_adapter("oxford_pets").scan(root, "train")
    partial = get_adapter("oxford_pets").scan(root, "train", check_files=False)
    assert len(partial.entries) == 3
    assert len(get_adapter("oxford_pets").scan(root, "test").entries) == 2  # other splits are complete


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({"train": [["a/1.jpg", 0, "a"]], "val": []}, r"has no key\(s\) 'test'"),
        ({"train": [["a/1.jpg", 0, "a"], ["b/1.jpg", 0, "b"]], "val": [], "test": []},
         r"label 0 two class names, 'a' and 'b'"),
        ({"train": [["a/1.jpg", 0, "a"], ["c/1.jpg", 2, "c"]], "val": [], "test": []}, r"no image for label\(s\) '1'"),
        ({"train": [["a/1.jpg", 0, "x_y"], ["b/1.jpg", 1, "x y"]], "val": [], "test": []},
         r"labels 0 and 1 the same class name 'x y'"),
        ({"train": [["../a/1.jpg", 0, "a"]], "val": [], "test": []}, r"train\[0\].*contains '\.\.'"),
        ({"train": [["a/1.jpg", "0", "a"]], "val": [], "test": []}, r"train\[0\]: the label must be an integer"),
        ({"train": [["a/1.jpg", 0]], "val": [], "test": []}, r"train\[0\] must be \[path, label, class name\]"),
        ({"train": [["a/1.jpg", 0, "a"], ["a/1.jpg", 0, "a"]], "val": [], "test": []}, r"lists 'a/1\.jpg' twice"),
    ],
    ids=["missing-key", "two-names", "label-gap", "name-clash", "escaping-path", "string-label", "short-record",
         "duplicate"],
)
def test_damaged_split_files_are_refused(tmp_path: Path, split: dict, message: str) -> None:
    root = tmp_path / "dtd"
    root.mkdir()
    (root / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    with pytest.raises(LayoutError, match=message):
        get_adapter("dtd").scan(root, "train", check_files=False)


def test_split_file_not_json(tmp_path: Path) -> None:
    (tmp_path / "split_zhou_Food101.json").write_text("{not json")
    with pytest.raises(LayoutError, match=r"split_zhou_Food101\.json is not valid JSON"):
        get_adapter("food101").scan(tmp_path)


def test_class_names_need_a_root_for_dataset_defined_classes() -> None:
    with pytest.raises(AdapterError, match=r"read from the dataset \(its split_zhou_UCF101\.json\); pass its root"):
        get_adapter("ucf101").class_names()


# --- FGVC-Aircraft -----------------------------------------------------------------------

VARIANTS = ["Falcon 2000", "707-320", "F-16A/B"]  # deliberately not sorted: label = file order


def _write_aircraft(base: Path, make_image) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    (base / "variants.txt").write_text("\n".join(VARIANTS) + "\n")
    lists = {
        "train": ["1025794 707-320", "0062781 F-16A/B", "2224851 Falcon 2000"],
        "val": ["0034309 707-320"],
        "test": ["1514522 F-16A/B", ""],
    }
    seed = 0
    for split, lines in lists.items():
        (base / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        for line in filter(None, lines):
            make_image(base / "images" / f"{line.split(' ')[0]}.jpg", seed, fmt="JPEG")
            seed += 1
    return base


@pytest.mark.parametrize("base_dir", ["", "data", "fgvc-aircraft-2013b/data"])
def test_fgvc_aircraft(tmp_path: Path, make_image, base_dir: str) -> None:
    root = tmp_path / "fgvc_aircraft"
    _write_aircraft(root / base_dir if base_dir else root, make_image)
    adapter = get_adapter("fgvc_aircraft")
    assert adapter.templates == ["a photo of a {}, a type of aircraft."]
    prefix = f"{base_dir}/images" if base_dir else "images"
    train = adapter.scan(root, "train")
    assert train.classes == tuple(VARIANTS)
    assert train.entries == (
        ImageEntry(f"{prefix}/0062781.jpg", 2, "F-16A/B"),
        ImageEntry(f"{prefix}/1025794.jpg", 1, "707-320"),
        ImageEntry(f"{prefix}/2224851.jpg", 0, "Falcon 2000"),
    )
    assert [e.path for e in adapter.scan(root, "val").entries] == [f"{prefix}/0034309.jpg"]
    assert [e.label for e in adapter.scan(root, "test").entries] == [2]
    assert adapter.class_names(root) == VARIANTS


def test_fgvc_aircraft_errors(tmp_path: Path, make_image) -> None:
    adapter = get_adapter("fgvc_aircraft")
    with pytest.raises(LayoutError, match=r"no class list found; looked for .*variants\.txt, .*data/variants\.txt"):
        adapter.scan(tmp_path)
    root = _write_aircraft(tmp_path / "fgvc_aircraft", make_image)
    (root / "images_variant_val.txt").write_text("0034309 Boeing 747-400\n")
    with pytest.raises(LayoutError, match=r"images_variant_val\.txt line 1 names the class 'Boeing 747-400'"):
        adapter.scan(root, "val")
    (root / "images_variant_val.txt").write_text("0034309\n")
    with pytest.raises(LayoutError, match=r"line 1 must read '<image id> <class name>'"):
        adapter.scan(root, "val")
    (root / "images" / "1514522.jpg").unlink()
    missing = r"1 image\(s\) named by images_variant_test\.txt are missing.*'images/1514522\.jpg'"
    with pytest.raises(LayoutError, match=missing):
        adapter.scan(root, "test")


def test_split_json_on_s3(s3_bucket, tmp_path: Path, make_image, upload) -> None:
    client, bucket = s3_bucket
    local = _write_split_set(tmp_path / "dtd", "split_zhou_DescribableTextures.json", "images", make_image)
    upload(client, bucket, local, "coop/dtd")
    adapter = get_adapter("dtd")
    remote = adapter.scan(f"s3://{bucket}/coop/dtd", "test")
    assert remote.root == f"s3://{bucket}/coop/dtd"
    assert remote.classes == ("accordion", "wild cat", "yin yang")
    assert remote.entries == adapter.scan(local, "test").entries
    assert adapter.class_names(f"s3://{bucket}/coop/dtd") == ["accordion", "wild cat", "yin yang"]
    client.delete_object(Bucket=bucket, Key="coop/dtd/images/yin_yang/image_0005.jpg")
    with pytest.raises(LayoutError, match=r"missing under s3://.*/coop/dtd/images: 'images/yin_yang/image_0005\.jpg'"):
        adapter.scan(f"s3://{bucket}/coop/dtd", "test")
