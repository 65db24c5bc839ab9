"""The adapter registry, the spec format and the generic ImageFolder adapter."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from saft.data.adapters import (
    AdapterError,
    SpecError,
    UnknownDatasetError,
    adapter_from_spec_file,
    get_adapter,
    list_adapters,
)
from saft.data.imagefolder import scan_image_folder

EXPECTED = {
    "imagefolder", "imagenet", "imagenet-v2", "imagenet-sketch", "imagenet-a", "imagenet-r",
    "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
    "sun397", "dtd", "eurosat", "ucf101",
}
EVAL_ONLY = {"imagenet-v2", "imagenet-sketch", "imagenet-a", "imagenet-r"}


def test_registry_lists_every_dataset() -> None:
    names = list_adapters()
    assert names == sorted(names)
    assert set(names) == EXPECTED
    for name in names:
        adapter = get_adapter(name)
        assert adapter.name == name
        assert adapter.eval_only == (name in EVAL_ONLY)
        assert adapter.default_split in adapter.splits
        assert adapter.templates and all(t.count("{}") == 1 for t in adapter.templates)
        assert adapter.spec.layout_hint


def test_unknown_adapter_lists_known_ones() -> None:
    with pytest.raises(UnknownDatasetError) as caught:
        get_adapter("imagenet_v2")
    message = str(caught.value)
    assert "unknown dataset 'imagenet_v2'" in message
    for name in EXPECTED:
        assert name in message
    assert isinstance(caught.value, AdapterError)


def test_imagefolder_matches_scan_image_folder(image_tree: Path) -> None:
    (image_tree / "empty_class").mkdir()
    adapter = get_adapter("imagefolder")
    index = adapter.scan(image_tree)
    expected = scan_image_folder(image_tree)
    assert index == expected
    assert index.classes == ("ant", "bee", "cat", "dog", "empty_class")
    assert adapter.class_names(image_tree) == list(expected.classes)
    assert adapter.templates == ["a photo of a {}."]
    assert adapter.imagenet_subset is None
    adapter.check_trainable()


def test_imagefolder_on_s3(s3_bucket, image_tree: Path, upload) -> None:
    client, bucket = s3_bucket
    upload(client, bucket, image_tree, "tree")
    remote = get_adapter("imagefolder").scan(f"s3://{bucket}/tree")
    assert remote.root == f"s3://{bucket}/tree"
    assert remote.entries == scan_image_folder(image_tree).entries
    assert remote.classes == ("ant", "bee", "cat", "dog")


# --- spec files ----------------------------------------------------------------------------

GOOD_SPEC = """
name: my-folders
title: My folders
layout: class-folders
eval_only: false
classes: {source: folder-names}
templates:
  default: ["a photo of a {}, seen from above."]
splits:
  train: [train]
  test: [test, ""]
default_split: train
layout_hint: <root>/train/<class>/<image>
"""


def _spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_custom_spec_file(tmp_path: Path, make_image) -> None:
    make_image(tmp_path / "data" / "train" / "owl" / "1.png", 1)
    make_image(tmp_path / "data" / "train" / "bat" / "2.png", 2)
    make_image(tmp_path / "data" / "test" / "owl" / "3.png", 3)
    adapter = adapter_from_spec_file(_spec(tmp_path, GOOD_SPEC))
    index = adapter.scan(tmp_path / "data")
    assert index.classes == ("bat", "owl")
    assert [(e.path, e.label) for e in index.entries] == [("train/bat/2.png", 0), ("train/owl/1.png", 1)]
    assert [e.path for e in adapter.scan(tmp_path / "data", "test").entries] == ["test/owl/3.png"]
    assert adapter.templates == ["a photo of a {}, seen from above."]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("eval_only: false", "eval_only: false\nshots: 4"), r"unknown field\(s\) 'shots'"),
        (("title: My folders\n", ""), r"required field 'title' is missing"),
        (("layout: class-folders", "layout: zip"), r"field 'layout' is 'zip'; use one of: class-folders"),
        (('["a photo of a {}, seen from above."]', '["a photo of a {name}."]'), r"exactly one '\{\}'"),
        (('["a photo of a {}, seen from above."]', '["a photo."]'), r"exactly one '\{\}'"),
        (("default_split: train", "default_split: val"), r"'val', which is not among the splits"),
        (("  test: [test, \"\"]", "  test: [../elsewhere]"), r"field 'splits'.*contains '\.\.'"),
        (("eval_only: false", "eval_only: maybe"), r"field 'eval_only' must be true or false"),
        (("{source: folder-names}", "{source: split-file}"), r"layout 'class-folders' cannot use"),
        (("default:", "short:"), r"needs a 'default' template set"),
    ],
    ids=["unknown-key", "missing-key", "bad-layout", "named-field", "no-placeholder", "bad-default",
         "escaping-folder", "non-bool", "wrong-class-source", "no-default-templates"],
)
def test_malformed_specs_name_file_and_field(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    old, new = change
    assert old in GOOD_SPEC
    path = _spec(tmp_path, GOOD_SPEC.replace(old, new, 1))
    with pytest.raises(SpecError, match=message) as caught:
        adapter_from_spec_file(path)
    assert str(path) in str(caught.value)


def test_spec_references_must_stay_in_trusted_packages(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace(
        '["a photo of a {}, seen from above."]', "{module: os, attribute: sep, count: 1}"
    )
    with pytest.raises(SpecError, match=r"'os' is not in a trusted package; specs may reference only open_clip, timm"):
        adapter_from_spec_file(_spec(tmp_path, text))


def test_changed_dependency_list_fails_clearly(tmp_path: Path) -> None:
    text = """
    name: shrunk
    title: Shrunk ImageNet
    layout: index-folders
    eval_only: true
    classes:
      source: packages
      keys: {package: timm.data, file: _info/imagenet_synsets.txt, count: 999}
      names: {module: open_clip.zero_shot_metadata, attribute: IMAGENET_CLASSNAMES, count: 1000}
    templates:
      default: {module: open_clip.zero_shot_metadata, attribute: SIMPLE_IMAGENET_TEMPLATES, count: 80}
    splits: {test: [""]}
    default_split: test
    layout_hint: <root>/<index>/<image>
    """
    adapter = adapter_from_spec_file(_spec(tmp_path, text))  # references are read lazily
    too_few = r"imagenet_synsets\.txt holds 1000 entries but the dataset spec expects 999; the installed timm"
    with pytest.raises(SpecError, match=too_few):
        adapter.class_names()
    too_many = r"SIMPLE_IMAGENET_TEMPLATES holds 7 entries but the dataset spec expects 80; the installed open_clip"
    with pytest.raises(SpecError, match=too_many):
        _ = adapter.templates


def test_missing_package_file_is_reported(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace("eval_only: false", "eval_only: true").replace(
        "classes: {source: folder-names}",
        "classes: {source: packages, keys: {package: timm.data, file: _info/no_such_list.txt, count: 3},"
        " names: {module: open_clip.zero_shot_metadata, attribute: IMAGENET_CLASSNAMES, count: 1000}}",
    )
    adapter = adapter_from_spec_file(_spec(tmp_path, text))
    with pytest.raises(SpecError, match=r"timm\.data:_info/no_such_list\.txt does not exist in the installed timm"):
        adapter.class_names()


def test_class_space_must_be_a_fixed_list(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace("classes: {source: folder-names}", "class_space: imagefolder")
    with pytest.raises(SpecError, match=r"'imagefolder' does not define a fixed class list"):
        adapter_from_spec_file(_spec(tmp_path, text))
    text = GOOD_SPEC.replace("classes: {source: folder-names}", "class_space: imagenet-9k")
    with pytest.raises(UnknownDatasetError, match=r"unknown dataset 'imagenet-9k'"):
        adapter_from_spec_file(_spec(tmp_path, text))
