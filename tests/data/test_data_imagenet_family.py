"""ImageNet and its distribution shifts (V2, Sketch, A, R) on trees with their real layouts.

Expected labels and names are written out (n01440764 is label 0 "tench", n15075141 is
999 "toilet paper"), so a change in how wnids are ordered or names are matched fails here.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from saft.data.adapters import AdapterError, EvalOnlyError, LayoutError, get_adapter
from saft.data.imagefolder import ImageEntry

TENCH, GOLDFISH, TOILET_PAPER = "n01440764", "n01443537", "n15075141"
STINGRAY, GOLDFINCH, ACORN = "n01498041", "n01531178", "n12267677"  # labels 6, 11, 988


def _timm_list(name: str) -> list[str]:
    return resources.files("timm.data").joinpath("_info", name).read_text().split()


def _tree(root: Path, make_image, folders: dict[str, list[str]], seed: int = 0) -> Path:
    for folder, files in folders.items():
        for name in files:
            make_image(root / folder / name, seed, fmt="JPEG")
            seed += 1
    return root


def test_imagenet_train_and_val_labels(tmp_path: Path, make_image) -> None:
    root = _tree(
        tmp_path / "imagenet",
        make_image,
        {
            f"train/{TENCH}": [f"{TENCH}_1.JPEG", f"{TENCH}_2.JPEG"],
            f"train/{TOILET_PAPER}": [f"{TOILET_PAPER}_7.JPEG"],
            f"val/{GOLDFISH}": ["ILSVRC2012_val_00000001.JPEG"],
        },
    )
    (root / "LOC_synset_mapping.txt").write_text("metadata files beside the splits are not images\n")
    adapter = get_adapter("imagenet")
    assert not adapter.eval_only
    adapter.check_trainable()
    names = adapter.class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet paper"
    assert len(adapter.templates) == 80 and all(t.count("{}") == 1 for t in adapter.templates)
    assert "a bad photo of a {}." in adapter.templates
    assert adapter.imagenet_subset is None

    train = adapter.scan(root, "train")
    assert train.classes == tuple(names)
    assert train.entries == (
        ImageEntry(f"train/{TENCH}/{TENCH}_1.JPEG", 0, "tench"),
        ImageEntry(f"train/{TENCH}/{TENCH}_2.JPEG", 0, "tench"),
        ImageEntry(f"train/{TOILET_PAPER}/{TOILET_PAPER}_7.JPEG", 999, "toilet paper"),
    )
    assert adapter.scan(root).entries == train.entries  # train is the default split
    val = adapter.scan(root, "val")
    assert val.entries == (ImageEntry(f"val/{GOLDFISH}/ILSVRC2012_val_00000001.JPEG", 1, "goldfish"),)
    assert adapter.scan(root, "test").entries == val.entries


def test_imagenet_simple_templates_and_unknown_set() -> None:
    simple = get_adapter("imagenet", templates="simple")
    assert simple.templates[0] == "itap of a {}." and len(simple.templates) == 7
    assert get_adapter("imagenet").with_templates("simple").templates == simple.templates
    with pytest.raises(AdapterError, match=r"no template set 'fancy'.*default, simple"):
        get_adapter("imagenet", templates="fancy")


def test_imagenet_refuses_stray_folders_and_flat_val(tmp_path: Path, make_image) -> None:
    root = _tree(tmp_path / "in", make_image, {f"train/{TENCH}": ["a.JPEG"], "train/n99999999": ["b.JPEG"]})
    with pytest.raises(LayoutError, match=r"1 folder\(s\) under .*train are not class keys.*'n99999999'"):
        get_adapter("imagenet").scan(root, "train")
    make_image(root / "val" / "ILSVRC2012_val_00000001.JPEG", 5, fmt="JPEG")  # unsorted val images
    with pytest.raises(LayoutError, match=r"no class folders with images for split 'val'.*sorted into wnid folders"):
        get_adapter("imagenet").scan(root, "val")
    with pytest.raises(AdapterError, match=r"no split 'holdout'; its splits: train, val, test"):
        get_adapter("imagenet").scan(root, "holdout")


@pytest.mark.parametrize("nested", [True, False], ids=["parent-root", "folder-root"])
def test_imagenet_v2_index_folders(tmp_path: Path, make_image, nested: bool) -> None:
    base = tmp_path / "v2"
    folder = base / "imagenetv2-matched-frequency-format-val" if nested else base
    _tree(folder, make_image, {"0": ["7e1f.jpeg"], "1": ["a0b1.jpeg", "c2d3.jpeg"], "999": ["ffee.jpeg"]})
    adapter = get_adapter("imagenet-v2")
    index = adapter.scan(base)
    prefix = "imagenetv2-matched-frequency-format-val/" if nested else ""
    assert [(e.path, e.label, e.class_name) for e in index.entries] == [
        (f"{prefix}0/7e1f.jpeg", 0, "tench"),
        (f"{prefix}1/a0b1.jpeg", 1, "goldfish"),
        (f"{prefix}1/c2d3.jpeg", 1, "goldfish"),
        (f"{prefix}999/ffee.jpeg", 999, "toilet paper"),
    ]
    assert len(index.classes) == 1000 and index.classes[999] == "toilet paper"
    assert adapter.templates == get_adapter("imagenet").templates


@pytest.mark.parametrize("bad", ["1000", "007", TENCH])
def test_imagenet_v2_refuses_non_index_folders(tmp_path: Path, make_image, bad: str) -> None:
    root = _tree(tmp_path / "v2", make_image, {"5": ["x.jpeg"], bad: ["y.jpeg"]})
    with pytest.raises(LayoutError, match=rf"not class indices 0\.\.999.*'{bad}'"):
        get_adapter("imagenet-v2").scan(root)


@pytest.mark.parametrize("nested", ["sketch", "images", ""], ids=["sketch-folder", "images-folder", "wnids-at-root"])
def test_imagenet_sketch(tmp_path: Path, make_image, nested: str) -> None:
    base = tmp_path / "imagenet-sketch"
    _tree(base / nested if nested else base, make_image, {GOLDFISH: ["sketch_1.JPEG"], TENCH: ["sketch_0.JPEG"]})
    index = get_adapter("imagenet-sketch").scan(base)
    prefix = f"{nested}/" if nested else ""
    assert [(e.path, e.label, e.class_name) for e in index.entries] == [
        (f"{prefix}{TENCH}/sketch_0.JPEG", 0, "tench"),
        (f"{prefix}{GOLDFISH}/sketch_1.JPEG", 1, "goldfish"),
    ]


def test_empty_root_explains_expected_layout(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    expected = r"looked in .*/sketch/<class>/, .*/images/<class>/, .*/<class>/\. Expected layout: <root>/sketch/<wnid>"
    with pytest.raises(LayoutError, match=expected):
        get_adapter("imagenet-sketch").scan(tmp_path / "empty")


@pytest.mark.parametrize("name", ["imagenet-v2", "imagenet-sketch", "imagenet-a", "imagenet-r"])
def test_shift_sets_are_eval_only(name: str) -> None:
    adapter = get_adapter(name)
    assert adapter.eval_only and adapter.splits == ("test",)
    with pytest.raises(EvalOnlyError, match=rf"'{name}'.*evaluation-only.*must not be trained on"):
        adapter.check_trainable()
    with pytest.raises(AdapterError, match=r"no split 'train' \(it is evaluation-only\); its splits: test"):
        adapter.scan("/nonexistent-root", "train")


@pytest.mark.parametrize(("name", "synsets", "indices"), [
    ("imagenet-a", "imagenet_a_synsets.txt", "imagenet_a_indices.txt"),
    ("imagenet-r", "imagenet_r_synsets.txt", "imagenet_r_indices.txt"),
])
def test_200_class_subsets(name: str, synsets: str, indices: str) -> None:
    subset = get_adapter(name).imagenet_subset
    assert subset is not None and len(subset) == 200
    assert subset == sorted(subset) and len(set(subset)) == 200
    assert all(0 <= label <= 999 for label in subset)
    wnids = _timm_list("imagenet_synsets.txt")
    assert wnids == sorted(wnids)
    assert [wnids[label] for label in subset] == sorted(_timm_list(synsets))
    # timm also ships the subset as label indices: both descriptions must agree.
    assert subset == sorted(int(i) for i in _timm_list(indices))


def test_imagenet_a_labels_in_1000_class_space(tmp_path: Path, make_image) -> None:
    root = _tree(tmp_path / "imagenet-a", make_image, {STINGRAY: ["0.000116_a.jpg"], ACORN: ["0.0_b.jpg"]})
    (root / "README.txt").write_text("files at the top are not classes")
    adapter = get_adapter("imagenet-a")
    index = adapter.scan(root)
    assert [(e.label, e.class_name) for e in index.entries] == [(6, "stingray"), (988, "acorn")]
    assert len(index.classes) == 1000
    assert {6, 988} <= set(adapter.imagenet_subset or [])
    assert "restricts the logits" in adapter.spec.notes


def test_imagenet_r_accepts_nested_folder_and_refuses_classes_outside_subset(tmp_path: Path, make_image) -> None:
    base = tmp_path / "data"
    _tree(base / "imagenet-r", make_image, {GOLDFISH: ["art_0.jpg"], ACORN: ["cartoon_1.jpg"]})
    index = get_adapter("imagenet-r").scan(base)
    assert [(e.path, e.label) for e in index.entries] == [
        (f"imagenet-r/{GOLDFISH}/art_0.jpg", 1),
        (f"imagenet-r/{ACORN}/cartoon_1.jpg", 988),
    ]
    # goldfish is in ImageNet-R but not in ImageNet-A: a goldfish folder there is a wrong root.
    root_a = _tree(tmp_path / "a", make_image, {GOLDFISH: ["x.jpg"], STINGRAY: ["y.jpg"]})
    with pytest.raises(LayoutError, match=rf"covers 200 of the 1000 classes.*'{GOLDFISH}'"):
        get_adapter("imagenet-a").scan(root_a)


def test_imagenet_v2_on_s3(s3_bucket, tmp_path: Path, make_image, upload) -> None:
    client, bucket = s3_bucket
    local = _tree(tmp_path / "v2", make_image, {"imagenetv2-matched-frequency-format-val/3": ["a.jpeg"],
                                                "imagenetv2-matched-frequency-format-val/998": ["b.jpeg"]})
    upload(client, bucket, local, "datasets/imagenet-v2")
    remote = get_adapter("imagenet-v2").scan(f"s3://{bucket}/datasets/imagenet-v2")
    assert remote.root == f"s3://{bucket}/datasets/imagenet-v2"
    assert remote.entries == get_adapter("imagenet-v2").scan(local).entries
    assert [e.label for e in remote.entries] == [3, 998]
