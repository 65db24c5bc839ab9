"""The prepare step: the files it writes, their determinism, and what it refuses.

The second half prepares every dataset of the adapter registry from fixture trees in its
real layout (CoOp split files, FGVC-Aircraft lists, ImageNet wnid folders); the builders
here are shared with the CLI and validation tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from importlib import resources
from pathlib import Path

import pytest
from PIL import Image

import saft.data.prepare as prepare_mod
from saft.data.adapters import DatasetAdapter, EvalOnlyError, LayoutError, get_adapter, list_adapters
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
OUTPUTS = {"train.jsonl", "classes.json", "templates.json", "train_templates.json", "prepare.json"}


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
    keys = ("dataset", "split", "root", "shots", "seed", "val_shots", "subset", "saft_version")
    assert {k: record[k] for k in keys} == {
        "dataset": "imagefolder",
        "split": "all",
        "root": str(image_tree),
        "shots": 2,
        "seed": 3,
        "val_shots": 1,
        "subset": "all",
        "saft_version": __version__,
    }
    assert record["counts"] == {"classes": 4, "images": 24, "read": 12, "skipped_broken": 0, "train": 8, "val": 4}
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
    result = prepare_dataset(image_tree, out, shots=2, val_shots=0)
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert result.val_hash is None and result.val_count == 0
    assert "val" not in json.loads((out / "prepare.json").read_text())["manifests"]


def test_base_and_new_subsets(image_tree: Path, tmp_path: Path) -> None:
    full = read_manifest(prepare_dataset(image_tree, tmp_path / "all", shots=2, val_shots=0).files["train"])
    base_res = prepare_dataset(image_tree, tmp_path / "base", shots=2, subset="base", val_shots=0)
    new_res = prepare_dataset(image_tree, tmp_path / "new", shots=2, subset="new", val_shots=0)
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
        prepare_dataset(image_tree, tmp_path / "out", shots=1, templates=["a photo"], val_shots=0)
    assert not (tmp_path / "out").exists()
    result = prepare_dataset(image_tree, tmp_path / "ok", shots=1, templates=["art of a {}.", "a {}."], val_shots=0)
    assert json.loads((tmp_path / "ok" / "templates.json").read_text()) == ["art of a {}.", "a {}."]
    assert result.templates == ("art of a {}.", "a {}.")


# --- refusals ----------------------------------------------------------------------------


def test_corrupt_image_is_refused_unless_skipped(image_tree: Path, tmp_path: Path, caplog) -> None:
    break_image(image_tree / "bee" / "img03.jpg")  # bee's 2nd image in seed 1's order: drawn at 2 shots
    out = tmp_path / "out"
    with pytest.raises(DataValidationError, match="--skip-corrupt") as caught:
        prepare_dataset(image_tree, out, shots=2, val_shots=0)
    assert "bee/img03.jpg" in str(caught.value) and "corrupt" in str(caught.value)
    assert "replace each with the next image of its class" in str(caught.value)
    assert caught.value.report.bad_paths() == {"bee/img03.jpg"}
    assert not out.exists()

    with caplog.at_level(logging.WARNING, logger="saft.data.prepare"):
        result = prepare_dataset(image_tree, out, shots=5, skip_corrupt=True, val_shots=0)
    assert "replaced 1 broken drawn image(s)" in caplog.text and "bee/img03.jpg" in caplog.text
    assert result.skipped == 1 and result.record["counts"]["skipped_broken"] == 1
    assert result.record["counts"]["read"] == 4 * 5 + 1  # the replacement was read too
    train = read_manifest(out / "train.jsonl")
    assert "bee/img03.jpg" not in {e.path for e in train}
    assert sum(e.class_name == "bee" for e in train) == 5  # the class still has its 5 shots


def test_skip_corrupt_does_not_hide_class_problems(image_tree: Path, tmp_path: Path) -> None:
    # The first images of seed 1's order: ant/img03.jpg and bee/img02.png are both drawn.
    shutil.copy(image_tree / "ant" / "img03.jpg", image_tree / "bee" / "img02.png")
    with pytest.raises(DataValidationError, match="conflicting_duplicate") as caught:
        prepare_dataset(image_tree, tmp_path / "out", shots=1, skip_corrupt=True, val_shots=0)
    assert "cannot fix these" in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"dataset": "cifar10"}, PrepareError, "dataset 'cifar10' is not supported; supported datasets: caltech101, "),
        ({"dataset": "imagenet-r"}, EvalOnlyError, "'imagenet-r' .* is evaluation-only"),
        ({"split": "train"}, PrepareError, "dataset 'imagefolder' has no split 'train'; its splits: all"),
        ({"dataset": "imagenet", "split": "holdout"}, PrepareError, "no split 'holdout'; its splits: train, val, test"),
        ({"shots": 0}, PrepareError, "shots must be >= 1, got 0"),
        ({"val_shots": -1}, PrepareError, "val_shots must be >= 0, got -1"),
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
        prepare_dataset(tmp_path / "missing", tmp_path / "out", val_shots=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="holds no class folders"):
        prepare_dataset(tmp_path / "empty", tmp_path / "out", val_shots=0)
    with pytest.raises(PrepareError, match="inside the dataset root"):
        prepare_dataset(image_tree, image_tree / "prepared", shots=1, val_shots=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrepareError, match="exists and is not a folder"):
        prepare_dataset(image_tree, tmp_path / "file", shots=1, val_shots=0)
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
        if isinstance(obj, list) and obj == CLASSES:  # after prepare.json and both template files were staged
            raise OSError("disk full")
        return real_write_json(path, obj)

    monkeypatch.setattr(prepare_mod, "write_json", failing_write_json)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(image_tree, out, shots=3, seed=2, val_shots=0)
    assert len(calls) == 4  # the failure hit after other outputs had been staged
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
    break_image(image_tree / "dog" / "img01.jpg")  # drawn first in seed 1's order
    upload(client, bucket, image_tree, "tree")
    with pytest.raises(DataValidationError, match="dog/img01.jpg"):
        prepare_dataset(f"s3://{bucket}/tree", tmp_path / "out", shots=2, val_shots=0)
    assert not (tmp_path / "out").exists()
    result = prepare_dataset(f"s3://{bucket}/tree", tmp_path / "out", shots=2, skip_corrupt=True, val_shots=0)
    assert result.skipped == 1
    assert "dog/img01.jpg" not in (tmp_path / "out" / "train.jsonl").read_text()


# --- fixture trees in the registry's layouts ---------------------------------------------

# Class names as CoOp split files write them; the adapter turns underscores into spaces.
SPLIT_CLASSES = ("abyssinian", "american_bulldog", "yorkshire_terrier")
SPLIT_SIZES = {"train": 3, "val": 1, "test": 1}
TENCH, GOLDFISH, TOILET_PAPER = "n01440764", "n01443537", "n15075141"  # labels 0, 1, 999
MISSILES = ("n03773504", "n04008634")  # labels 657 and 744, both named "missile" by CLIP


def write_distinct_image(path: Path, number: int) -> Path:
    """A 4x4 PNG in a colour that encodes ``number``: distinct bytes for up to 2**24 images."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), ((number >> 16) & 255, (number >> 8) & 255, number & 255)).save(path, format="PNG")
    return path


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet wnids in label order (the installed list the adapter reads too)."""
    return sorted(resources.files("timm.data").joinpath("_info", "imagenet_synsets.txt").read_text().split())


def split_records(split: str) -> list[list]:
    """``[path under the image folder, label, class name]`` records of one split."""
    first = sum(SPLIT_SIZES[s] for s in list(SPLIT_SIZES)[: list(SPLIT_SIZES).index(split)])
    return [
        [f"{name}/{name}_{first + i}.jpg", label, name]
        for label, name in enumerate(SPLIT_CLASSES)
        for i in range(SPLIT_SIZES[split])
    ]


def write_split_json_tree(root: Path, adapter: DatasetAdapter) -> Path:
    """A split-json root with the dataset's real split-file and image-folder names."""
    spec = adapter.spec
    records = {key: split_records(split) for split, (key,) in spec.splits.items()}
    root.mkdir(parents=True, exist_ok=True)
    (root / (spec.split_file or "")).write_text(json.dumps(records))
    number = 0
    for items in records.values():
        for path, _, _ in items:
            write_distinct_image(root / spec.image_dir / path if spec.image_dir else root / path, number)
            number += 1
    return root


def write_aircraft_tree(root: Path, adapter: DatasetAdapter) -> Path:
    """An FGVC-Aircraft root: variants.txt (label = line order) and one image list per split."""
    spec = adapter.spec
    variants = ["Falcon 2000", "707-320", "F-16A/B"]
    base = root / spec.base_dirs[0] if spec.base_dirs[0] else root
    base.mkdir(parents=True, exist_ok=True)
    (base / (spec.classes.file or "")).write_text("\n".join(variants) + "\n")
    number = 0
    for split, (list_file,) in spec.splits.items():
        lines = []
        for variant in variants:
            for _ in range(SPLIT_SIZES[split]):
                image_id = f"{1000000 + number:07d}"
                write_distinct_image(base / spec.image_dir / f"{image_id}{spec.image_suffix}", number)
                lines.append(f"{image_id} {variant}")
                number += 1
        (base / list_file).write_text("\n".join(lines) + "\n")
    return root


def write_folder_tree(root: Path, classes: tuple[str, ...] = SPLIT_CLASSES, per_class: int = 3) -> Path:
    for label, name in enumerate(classes):
        for i in range(per_class):
            write_distinct_image(root / name / f"{i}.png", label * per_class + i)
    return root


def write_imagenet_tree(root: Path, wnids: list[str]) -> Path:
    """train/<wnid>/ with one image per wnid (three for tench), val/<wnid>/ for tench and goldfish."""
    for number, wnid in enumerate(wnids):
        write_distinct_image(root / "train" / wnid / f"{wnid}_{number}.png", number)
    if TENCH in wnids:
        for extra in (1, 2):
            write_distinct_image(root / "train" / TENCH / f"{TENCH}_extra{extra}.png", 5000 + extra)
    write_distinct_image(root / "val" / TENCH / "ILSVRC2012_val_00000001.png", 6000)
    write_distinct_image(root / "val" / GOLDFISH / "ILSVRC2012_val_00000002.png", 6001)
    return root


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete ImageNet class space in miniature: every one of the 1000 wnids has a train image."""
    return write_imagenet_tree(tmp_path_factory.mktemp("imagenet") / "images", imagenet_wnids())


def build_tree(adapter: DatasetAdapter, root: Path, request: pytest.FixtureRequest) -> Path:
    """A small root of ``adapter``'s dataset, chosen by its layout kind."""
    spec = adapter.spec
    if spec.layout == "split-json":
        return write_split_json_tree(root, adapter)
    if spec.layout == "aircraft-txt":
        return write_aircraft_tree(root, adapter)
    if spec.layout == "class-folders" and spec.classes.source == "folder-names":
        return write_folder_tree(root)
    if spec.layout == "class-folders" and adapter.name == "imagenet":
        return request.getfixturevalue("imagenet_root")
    pytest.fail(f"no fixture builder for dataset {adapter.name!r} (layout {spec.layout!r}); add one here")


# --- every dataset of the registry -------------------------------------------------------


@pytest.mark.parametrize("name", list_adapters())
def test_every_registered_dataset_is_prepared_or_refused(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    adapter = get_adapter(name)
    out = tmp_path / "out"
    if adapter.eval_only:
        with pytest.raises(EvalOnlyError, match=rf"'{name}' .*evaluation-only.*must not be trained on"):
            prepare_dataset(tmp_path, out, dataset=name, shots=1, val_shots=0)
        assert not out.exists()
        return
    root = build_tree(adapter, tmp_path / name, request)
    result = prepare_dataset(root, out, dataset=name, shots=1, seed=2, val_shots=0)
    assert json.loads((out / "classes.json").read_text()) == adapter.class_names(root)
    assert json.loads((out / "templates.json").read_text()) == adapter.templates
    assert (result.record["dataset"], result.record["split"]) == (name, adapter.default_split)
    train = read_manifest(out / "train.jsonl")
    assert len(train) == len(adapter.class_names(root))  # one shot of every class
    split_entries = {(e.path, e.label) for e in adapter.scan(root).entries}
    assert {(e.path, e.label) for e in train} <= split_entries
    for entry in train:
        assert entry.sha256 == sha(root / entry.path)


# --- CoOp split files --------------------------------------------------------------------


@pytest.fixture
def pets_root(tmp_path: Path) -> Path:
    return write_split_json_tree(tmp_path / "oxford_pets", get_adapter("oxford_pets"))


def test_split_json_draws_only_from_the_chosen_split(pets_root: Path, tmp_path: Path) -> None:
    names = ["abyssinian", "american bulldog", "yorkshire terrier"]
    result = prepare_dataset(pets_root, tmp_path / "train", dataset="oxford_pets", shots=2, val_shots=1, seed=3)
    assert result.classes == tuple(names)
    assert result.templates == ("a photo of a {}, a type of pet.",)
    assert (result.record["split"], result.record["counts"]["images"]) == ("train", 9)
    train = read_manifest(tmp_path / "train" / "train.jsonl")
    val = read_manifest(tmp_path / "train" / "val.jsonl")
    train_split = {f"images/{path}" for path, _, _ in split_records("train")}
    # Both manifests come out of the split file's train images, never its val/test ones.
    assert {e.path for e in train + val} <= train_split and len(train) == 6 and len(val) == 3
    assert {(e.label, e.class_name) for e in train} == set(enumerate(names))

    from_val = prepare_dataset(pets_root, tmp_path / "val", dataset="oxford_pets", split="val", shots=1, val_shots=0)
    assert from_val.record["split"] == "val"
    assert {e.path for e in read_manifest(tmp_path / "val" / "train.jsonl")} == {
        f"images/{path}" for path, _, _ in split_records("val")
    }


def test_split_json_is_deterministic_and_user_templates_win(pets_root: Path, tmp_path: Path) -> None:
    prepare_dataset(pets_root, tmp_path / "a", dataset="oxford_pets", shots=2, seed=9, val_shots=0)
    prepare_dataset(pets_root, tmp_path / "b", dataset="oxford_pets", shots=2, seed=9, val_shots=0)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    custom = prepare_dataset(pets_root, tmp_path / "c", dataset="oxford_pets", shots=2, templates=["a pet: {}."], val_shots=0)
    assert json.loads((tmp_path / "c" / "templates.json").read_text()) == ["a pet: {}."]
    assert custom.templates == ("a pet: {}.",)


def test_split_json_checks_drawn_images_of_the_split_only(pets_root: Path, tmp_path: Path, caplog) -> None:
    break_image(pets_root / "images" / "yorkshire_terrier" / "yorkshire_terrier_4.jpg")  # a test image
    clean = prepare_dataset(pets_root, tmp_path / "ok", dataset="oxford_pets", shots=2, val_shots=0)
    assert clean.train_count == 6
    drawn = [e.path for e in read_manifest(tmp_path / "ok" / "train.jsonl") if e.label == 0]
    broken = pets_root / drawn[0]  # a drawn train image
    break_image(broken)
    with pytest.raises(DataValidationError, match=r"\(oxford_pets, split 'train'\): 1 of the 6 drawn") as caught:
        prepare_dataset(pets_root, tmp_path / "out", dataset="oxford_pets", shots=2, val_shots=0)
    assert caught.value.report.bad_paths() == {drawn[0]}
    assert not (tmp_path / "out").exists()
    with caplog.at_level(logging.WARNING, logger="saft.data.prepare"):
        result = prepare_dataset(pets_root, tmp_path / "out", dataset="oxford_pets", shots=2, skip_corrupt=True, val_shots=0)
    assert result.skipped == 1 and "replaced 1 broken drawn image(s)" in caplog.text
    assert drawn[0] not in (tmp_path / "out" / "train.jsonl").read_text()


def test_split_json_missing_images_are_a_layout_error(pets_root: Path, tmp_path: Path) -> None:
    (pets_root / "images" / "american_bulldog" / "american_bulldog_2.jpg").unlink()
    with pytest.raises(LayoutError, match=r"1 image\(s\) named by split_zhou_OxfordPets\.json \(split 'train'\)"):
        prepare_dataset(pets_root, tmp_path / "out", dataset="oxford_pets", shots=1, val_shots=0)
    assert not (tmp_path / "out").exists()


def test_split_json_from_s3_matches_the_local_copy(pets_root: Path, tmp_path: Path, s3_bucket, upload) -> None:
    client, bucket = s3_bucket
    upload(client, bucket, pets_root, "coop/oxford_pets")
    uri = f"s3://{bucket}/coop/oxford_pets"
    remote = prepare_dataset(uri, tmp_path / "s3", dataset="oxford_pets", shots=2, seed=4, val_shots=0)
    local = prepare_dataset(pets_root, tmp_path / "local", dataset="oxford_pets", shots=2, seed=4, val_shots=0)
    for name in ("train.jsonl", "classes.json", "templates.json"):
        assert (tmp_path / "s3" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert remote.record["root"] == uri and remote.record["dataset"] == "oxford_pets"


# --- ImageNet ----------------------------------------------------------------------------


def test_imagenet_keeps_the_1000_class_labels_and_clip_prompts(imagenet_root: Path, tmp_path: Path) -> None:
    adapter = get_adapter("imagenet")
    result = prepare_dataset(imagenet_root, tmp_path / "out", dataset="imagenet", shots=1, seed=1, val_shots=0)
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes == adapter.class_names() and len(classes) == 1000
    assert classes[0] == "tench" and classes[999] == "toilet paper"
    templates = json.loads((tmp_path / "out" / "templates.json").read_text())
    assert len(templates) == 80 and "a bad photo of a {}." in templates
    assert result.record["counts"] == {
        "classes": 1000, "images": 1002, "read": 1000, "skipped_broken": 0, "train": 1000, "val": 0
    }
    by_label = {e.label: e for e in read_manifest(tmp_path / "out" / "train.jsonl")}
    assert sorted(by_label) == list(range(1000))
    assert by_label[0].path.startswith(f"train/{TENCH}/") and by_label[0].class_name == "tench"
    assert by_label[999].path == f"train/{TOILET_PAPER}/{TOILET_PAPER}_999.png"
    # The two classes CLIP calls "missile" stay two classes, each with its own image; the
    # manifest tells them apart by label, classes.json keeps the prompt name.
    assert classes[657] == classes[744] == "missile"
    assert by_label[657].path.startswith(f"train/{MISSILES[0]}/") and by_label[657].class_name == f"missile ({MISSILES[0]})"
    assert by_label[744].path.startswith(f"train/{MISSILES[1]}/") and by_label[744].class_name == f"missile ({MISSILES[1]})"


def test_imagenet_new_half_renumbers_labels(imagenet_root: Path, tmp_path: Path) -> None:
    result = prepare_dataset(imagenet_root, tmp_path / "new", dataset="imagenet", shots=1, subset="new",
                             templates=["a photo of a {}."], val_shots=0)
    classes = json.loads((tmp_path / "new" / "classes.json").read_text())
    assert classes == get_adapter("imagenet").class_names()[500:]
    train = read_manifest(tmp_path / "new" / "train.jsonl")
    assert sorted(e.label for e in train) == list(range(500))
    missiles = sorted((e.label, e.class_name) for e in train if e.class_name.startswith("missile"))
    assert missiles == [(657 - 500, f"missile ({MISSILES[0]})"), (744 - 500, f"missile ({MISSILES[1]})")]
    assert result.record["counts"]["classes"] == 500


def test_imagenet_with_missing_classes_is_refused(tmp_path: Path) -> None:
    root = write_imagenet_tree(tmp_path / "images", [TENCH, GOLDFISH, TOILET_PAPER])
    with pytest.raises(DataValidationError, match=r"classes are not what the dataset needs") as caught:
        prepare_dataset(root, tmp_path / "out", dataset="imagenet", shots=1, val_shots=0)
    report = caught.value.report
    assert report.count("missing_class") == 997
    assert "missing_class: 997 expected class(es) not found" in str(caught.value)
    assert "--skip-corrupt" in str(caught.value) and "cannot fix" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_drawing_from_the_evaluated_split_warns(imagenet_root: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="saft.data.prepare"):
        prepare_dataset(imagenet_root, tmp_path / "train", dataset="imagenet", shots=1, val_shots=0)
    assert "will not be a held-out number" not in caplog.text
    # val holds only 2 of the 1000 classes here, so the draw is refused, but only after the warning.
    with caplog.at_level(logging.WARNING, logger="saft.data.prepare"), pytest.raises(DataValidationError):
        prepare_dataset(imagenet_root, tmp_path / "val", dataset="imagenet", split="val", shots=1, val_shots=0)
    assert "split 'val' of imagenet, which holds the images its evaluation scores" in caplog.text
