"""The prepare step: the files it writes, their determinism, and what it refuses."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

import saft.data.prepare as prepare_mod
from saft.data.fewshot import FewShotError
from saft.data.manifest import read_manifest
from saft.data.prepare import (
    DEFAULT_TEMPLATES,
    PrepareError,
    TemplateError,
    load_templates,
    prepare_dataset,
)
from saft.data.storage import StorageError
from saft.data.validate import DataValidationError
from saft.version import __version__

CLASSES = ["ant", "bee", "cat", "dog"]
OUTPUTS = {"train.jsonl", "classes.json", "templates.json", "prepare.json"}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` (hidden temporaries included) with its bytes."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def break_image(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)


# --- outputs -----------------------------------------------------------------------------


def test_prepare_writes_the_step_outputs(image_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = prepare_dataset(image_tree, out, shots=2, seed=3, val_shots=1)
    assert {p.name for p in out.iterdir()} == OUTPUTS | {"val.jsonl"}
    assert json.loads((out / "classes.json").read_text()) == CLASSES
    assert json.loads((out / "templates.json").read_text()) == list(DEFAULT_TEMPLATES)

    train = read_manifest(out / "train.jsonl")
    val = read_manifest(out / "val.jsonl")
    assert len(train) == 8 and len(val) == 4
    for name in CLASSES:
        assert sum(e.class_name == name for e in train) == 2
        assert sum(e.class_name == name for e in val) == 1
    assert not {e.path for e in train} & {e.path for e in val}
    for entry in train + val:
        assert entry.label == CLASSES.index(entry.class_name)
        assert entry.sha256 == sha(image_tree / entry.path)

    record = json.loads((out / "prepare.json").read_text())
    assert {k: record[k] for k in ("dataset", "root", "shots", "seed", "val_shots", "subset", "saft_version")} == {
        "dataset": "imagefolder",
        "root": str(image_tree),
        "shots": 2,
        "seed": 3,
        "val_shots": 1,
        "subset": "all",
        "saft_version": __version__,
    }
    assert record["counts"] == {"classes": 4, "images": 24, "skipped_broken": 0, "train": 8, "val": 4}
    assert record["manifests"]["train"] == {"file": "train.jsonl", "sha256": sha(out / "train.jsonl"), "entries": 8}
    assert record["manifests"]["val"]["sha256"] == sha(out / "val.jsonl")
    assert result.manifest_hash == sha(out / "train.jsonl") and result.val_hash == sha(out / "val.jsonl")
    assert result.classes == tuple(CLASSES) and (result.train_count, result.val_count) == (8, 4)
    assert set(result.files) == {"train", "val", "classes", "templates", "record"}


def test_same_inputs_give_byte_identical_outputs(image_tree: Path, tmp_path: Path) -> None:
    first = prepare_dataset(image_tree, tmp_path / "a", shots=3, seed=7, val_shots=2)
    second = prepare_dataset(image_tree, tmp_path / "b", shots=3, seed=7, val_shots=2)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert first.record == second.record
    other = prepare_dataset(image_tree, tmp_path / "c", shots=3, seed=8, val_shots=2)
    assert other.manifest_hash != first.manifest_hash  # the seed really changes the draw


def test_no_val_manifest_without_val_shots_and_stale_one_removed(image_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_dataset(image_tree, out, shots=2, val_shots=1)
    assert (out / "val.jsonl").exists()
    result = prepare_dataset(image_tree, out, shots=2)
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert result.val_hash is None and result.val_count == 0
    assert "val" not in json.loads((out / "prepare.json").read_text())["manifests"]


def test_base_and_new_subsets(image_tree: Path, tmp_path: Path) -> None:
    full = read_manifest(prepare_dataset(image_tree, tmp_path / "all", shots=2).files["train"])
    base_res = prepare_dataset(image_tree, tmp_path / "base", shots=2, subset="base")
    new_res = prepare_dataset(image_tree, tmp_path / "new", shots=2, subset="new")
    assert json.loads((tmp_path / "base" / "classes.json").read_text()) == ["ant", "bee"]
    assert json.loads((tmp_path / "new" / "classes.json").read_text()) == ["cat", "dog"]
    base = read_manifest(base_res.files["train"])
    new = read_manifest(new_res.files["train"])
    assert {(e.class_name, e.label) for e in base} == {("ant", 0), ("bee", 1)}
    assert {(e.class_name, e.label) for e in new} == {("cat", 0), ("dog", 1)}  # renumbered within the half
    # A half draws the same images as the full run does for those classes.
    assert [e.path for e in base] == [e.path for e in full if e.class_name in {"ant", "bee"}]
    assert [e.path for e in new] == [e.path for e in full if e.class_name in {"cat", "dog"}]
    assert new_res.record["subset"] == "new" and new_res.record["counts"]["classes"] == 2
    assert new_res.record["counts"]["images"] == 12


# --- templates ---------------------------------------------------------------------------


def test_templates_from_list_and_files(tmp_path: Path) -> None:
    assert load_templates(None) == ("a photo of a {}.",)
    assert load_templates(["a {}.", "art of a {}."]) == ("a {}.", "art of a {}.")
    (tmp_path / "t.json").write_text(json.dumps(["a {}.", "a big {}."]))
    assert load_templates(tmp_path / "t.json") == ("a {}.", "a big {}.")
    (tmp_path / "t.yaml").write_text("templates:\n  - 'a {}.'\n  - 'a {} drawing.'\n")
    assert load_templates(str(tmp_path / "t.yaml")) == ("a {}.", "a {} drawing.")
    (tmp_path / "t.txt").write_text("# CLIP prompts\n\na photo of a {}.\n  a sketch of a {}.  \n")
    assert load_templates(tmp_path / "t.txt") == ("a photo of a {}.", "a sketch of a {}.")


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("t.txt", "a photo of a {}.\na photo\n", r"t\.txt, line 2: template 'a photo' must contain exactly one '\{\}'"),
        ("t.txt", "a {name}\n", "line 1: template 'a {name}' must contain exactly one"),
        ("t.txt", "a {} {}\n", "exactly one"),
        ("t.txt", "a { b\n", "not a valid format string"),
        ("t.txt", "a {}.\n# again\na {}.\n", "line 3: template 'a {}.' repeats templates file .*line 1"),
        ("t.txt", "# only comments\n\n", "holds no templates"),
        ("t.json", '["a {}.", 3]', r"item 2: a template must be a non-empty string, got 3"),
        ("t.json", '{"prompts": ["a {}."]}', "must hold a list of templates"),
        ("t.json", '["a {}.",', "is not valid JSON"),
        ("t.yaml", "- 'a {}.\n", "is not valid YAML"),
    ],
)
def test_template_file_errors_name_file_and_place(tmp_path: Path, name: str, content: str, needle: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TemplateError, match=needle) as caught:
        load_templates(path)
    assert str(path) in str(caught.value)


def test_missing_templates_file_and_bad_template_write_nothing(image_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="does not exist"):
        load_templates(tmp_path / "nope.txt")
    with pytest.raises(TemplateError, match="template 1: template 'a photo'"):
        prepare_dataset(image_tree, tmp_path / "out", shots=1, templates=["a photo"])
    assert not (tmp_path / "out").exists()
    result = prepare_dataset(image_tree, tmp_path / "ok", shots=1, templates=["art of a {}.", "a {}."])
    assert json.loads((tmp_path / "ok" / "templates.json").read_text()) == ["art of a {}.", "a {}."]
    assert result.templates == ("art of a {}.", "a {}.")


# --- refusals ----------------------------------------------------------------------------


def test_corrupt_image_is_refused_unless_skipped(image_tree: Path, tmp_path: Path, caplog) -> None:
    break_image(image_tree / "bee" / "img03.jpg")
    out = tmp_path / "out"
    with pytest.raises(DataValidationError, match="--skip-corrupt") as caught:
        prepare_dataset(image_tree, out, shots=2)
    assert "bee/img03.jpg" in str(caught.value) and "corrupt" in str(caught.value)
    assert caught.value.report.bad_paths() == {"bee/img03.jpg"}
    assert not out.exists()

    with caplog.at_level(logging.WARNING, logger="saft.data.prepare"):
        result = prepare_dataset(image_tree, out, shots=5, skip_corrupt=True)
    assert "skipped 1 of 24 entries" in caplog.text
    assert result.skipped == 1 and result.record["counts"]["skipped_broken"] == 1
    train = read_manifest(out / "train.jsonl")
    assert "bee/img03.jpg" not in {e.path for e in train}
    assert sum(e.class_name == "bee" for e in train) == 5  # the class still has its 5 shots


def test_skip_corrupt_does_not_hide_class_problems(image_tree: Path, tmp_path: Path) -> None:
    shutil.copy(image_tree / "ant" / "img00.png", image_tree / "bee" / "copy.png")
    with pytest.raises(DataValidationError, match="conflicting_duplicate"):
        prepare_dataset(image_tree, tmp_path / "out", shots=1, skip_corrupt=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"dataset": "imagenet"}, PrepareError, "dataset 'imagenet' is not supported; supported datasets: imagefolder"),
        ({"shots": 0}, PrepareError, "shots must be an integer >= 1, got 0"),
        ({"val_shots": -1}, PrepareError, "val_shots must be an integer >= 0"),
        ({"seed": "1"}, PrepareError, "seed must be an integer"),
        ({"subset": "half"}, PrepareError, "subset must be one of all, base, new, got 'half'"),
        ({"shots": 6, "val_shots": 1}, FewShotError, "fewer than 7 images"),
    ],
)
def test_bad_arguments_are_refused_before_writing(image_tree: Path, tmp_path: Path, kwargs, error, needle) -> None:
    with pytest.raises(error, match=needle):
        prepare_dataset(image_tree, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_bad_roots_and_output_folders(image_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        prepare_dataset(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="holds no class folders"):
        prepare_dataset(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(PrepareError, match="inside the dataset root"):
        prepare_dataset(image_tree, image_tree / "prepared", shots=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrepareError, match="exists and is not a folder"):
        prepare_dataset(image_tree, tmp_path / "file", shots=1)
    assert not (image_tree / "prepared").exists() and not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_earlier_outputs_intact(
    image_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    prepare_dataset(image_tree, out, shots=2, seed=1, val_shots=1)
    before = snapshot(out)
    real_write_json = prepare_mod.write_json
    calls: list[str] = []

    def failing_write_json(path, obj):
        calls.append(Path(path).name)
        if isinstance(obj, list) and obj == CLASSES:  # after prepare.json and templates.json were staged
            raise OSError("disk full")
        return real_write_json(path, obj)

    monkeypatch.setattr(prepare_mod, "write_json", failing_write_json)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(image_tree, out, shots=3, seed=2)
    assert len(calls) == 3  # the failure hit after other outputs had been staged
    assert snapshot(out) == before  # no new file, no leftover temporary, val.jsonl kept


# --- S3 roots ----------------------------------------------------------------------------


def test_prepare_from_s3_matches_the_local_copy(image_tree: Path, tmp_path: Path, s3_bucket, upload) -> None:
    client, bucket = s3_bucket
    upload(client, bucket, image_tree, "datasets/tree")
    remote = prepare_dataset(f"s3://{bucket}/datasets/tree/", tmp_path / "s3", shots=2, seed=5, val_shots=1)
    local = prepare_dataset(image_tree, tmp_path / "local", shots=2, seed=5, val_shots=1)
    # Manifests hold root-relative paths and content hashes, so they do not depend on where the root is.
    for name in ("train.jsonl", "val.jsonl", "classes.json", "templates.json"):
        assert (tmp_path / "s3" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert remote.record["root"] == f"s3://{bucket}/datasets/tree"
    assert remote.manifest_hash == local.manifest_hash


def test_s3_root_with_corrupt_object_is_refused_then_skipped(
    image_tree: Path, tmp_path: Path, s3_bucket, upload
) -> None:
    client, bucket = s3_bucket
    break_image(image_tree / "dog" / "img00.png")
    upload(client, bucket, image_tree, "tree")
    with pytest.raises(DataValidationError, match="dog/img00.png"):
        prepare_dataset(f"s3://{bucket}/tree", tmp_path / "out", shots=2)
    assert not (tmp_path / "out").exists()
    result = prepare_dataset(f"s3://{bucket}/tree", tmp_path / "out", shots=2, skip_corrupt=True)
    assert result.skipped == 1
    assert "dog/img00.png" not in (tmp_path / "out" / "train.jsonl").read_text()
