"""``saft data prepare`` / ``saft data validate``: exit codes and what the user reads."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest

from saft.data.adapters import get_adapter
from saft.cli.data import build_parser, main, register
from test_data_prepare import (
    GOLDFISH,
    TENCH,
    split_records,
    write_distinct_image,
    write_imagenet_tree,
    write_split_json_tree,
)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def break_image(path: Path) -> None:
    path.write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 10)


# --- prepare -----------------------------------------------------------------------------


def test_prepare_prints_a_summary(image_tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "data", "prepare", image_tree, "--out", out, "--shots", "2",
                               "--val-shots", "1", "--seed", "4")
    assert code == 0 and stderr == ""
    digest = hashlib.sha256((out / "train.jsonl").read_bytes()).hexdigest()
    assert "classes:       4" in stdout
    assert "train images:  8" in stdout and "val images:    4" in stdout
    assert f"manifest hash: {digest}" in stdout
    assert f"output folder: {out}" in stdout
    record = json.loads((out / "prepare.json").read_text())
    assert (record["shots"], record["seed"], record["val_shots"], record["subset"]) == (2, 4, 1, "all")


def test_prepare_subset_and_templates_flags(image_tree: Path, tmp_path: Path, capsys) -> None:
    templates = tmp_path / "prompts.txt"
    templates.write_text("a photo of a {}.\nan origami {}.\n")
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "data", "prepare", "--val-shots", "0", image_tree, "--out", out, "--shots", "1",
                          "--subset", "new", "--templates", templates)
    assert code == 0 and "classes:       2" in stdout
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]
    assert json.loads((out / "templates.json").read_text()) == ["a photo of a {}.", "an origami {}."]


def test_prepare_refuses_corrupt_images_unless_skipped(image_tree: Path, tmp_path: Path, capsys) -> None:
    break_image(image_tree / "cat" / "img01.jpg")
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "data", "prepare", "--val-shots", "0", image_tree, "--out", out, "--shots", "2")
    assert code == 2 and stdout == ""
    assert stderr.startswith("saft data prepare: error: dataset root")
    assert "cat/img01.jpg" in stderr and "--skip-corrupt" in stderr
    assert not out.exists()
    code, stdout, _ = run(capsys, "data", "prepare", "--val-shots", "0", image_tree, "--out", out, "--shots", "2", "--skip-corrupt")
    assert code == 0 and "skipped:       1 broken file(s)" in stdout
    assert "cat/img01.jpg" not in (out / "train.jsonl").read_text()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--shots", "0"], "--shots must be >= 1, got 0"),
        (["--shots", "many"], "argument --shots: invalid int value: 'many'"),
        (["--val-shots", "-2"], "--val-shots must be >= 0, got -2"),
        (["--subset", "half"], "argument --subset: invalid choice: 'half'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--dataset", "cifar10"], "dataset 'cifar10' is not supported; supported datasets: caltech101, dtd"),
        (["--split", "train"], "dataset 'imagefolder' has no split 'train'; its splits: all (default: all)"),
        (["--dataset", "imagenet"], "imagenet: no class folders with images for split 'train'"),
        (["--shots", "7"], "fewer than 7 images"),
    ],
)
def test_prepare_bad_flags_exit_2(image_tree: Path, tmp_path: Path, capsys, extra: list[str], needle: str) -> None:
    code, stdout, stderr = run(capsys, "data", "prepare", "--val-shots", "0", image_tree, "--out", tmp_path / "out", *extra)
    assert code == 2 and needle in stderr and stdout == ""
    assert not (tmp_path / "out").exists()


def test_prepare_missing_root_and_out(tmp_path: Path, capsys) -> None:
    code, _, stderr = run(capsys, "data", "prepare", "--val-shots", "0", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert code == 2
    missing = tmp_path / "nowhere"
    assert stderr.strip() == f"saft data prepare: error: dataset root {missing} does not exist or is not a directory"
    code, _, stderr = run(capsys, "data", "prepare", "--val-shots", "0", tmp_path)
    assert code == 2 and "the following arguments are required: --out" in stderr


def test_prepare_bad_templates_file_exit_2(image_tree: Path, tmp_path: Path, capsys) -> None:
    templates = tmp_path / "prompts.txt"
    templates.write_text("a photo of a {}.\na photo\n")
    code, _, stderr = run(capsys, "data", "prepare", "--val-shots", "0", image_tree, "--out", tmp_path / "out",
                          "--templates", templates)
    assert code == 2
    assert f"templates file {templates}, line 2: template 'a photo' must contain exactly one" in stderr
    assert not (tmp_path / "out").exists()


# --- validate ----------------------------------------------------------------------------


def test_validate_root_exit_codes(image_tree: Path, tmp_path: Path, capsys) -> None:
    code, stdout, _ = run(capsys, "data", "validate", image_tree)
    assert code == 0 and "24 file(s), 4 class(es): OK" in stdout
    break_image(image_tree / "ant" / "img05.jpg")
    code, stdout, stderr = run(capsys, "data", "validate", image_tree)
    assert code == 1 and stderr == ""
    assert "FAILED (1 error(s), 0 warning(s))" in stdout and "ant/img05.jpg" in stdout
    (tmp_path / "empty").mkdir()
    code, stdout, _ = run(capsys, "data", "validate", tmp_path / "empty")
    assert code == 1 and "no class folders found" in stdout


def test_validate_manifest(image_tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert run(capsys, "data", "prepare", "--val-shots", "0", image_tree, "--out", out, "--shots", "2")[0] == 0
    manifest = out / "train.jsonl"
    code, stdout, _ = run(capsys, "data", "validate", image_tree, "--manifest", manifest)
    assert code == 0 and "8 file(s), 4 class(es): OK" in stdout
    first = json.loads(manifest.read_text().splitlines()[0])
    (image_tree / first["path"]).write_bytes((image_tree / "dog" / "img00.png").read_bytes())
    code, stdout, _ = run(capsys, "data", "validate", image_tree, "--manifest", manifest)
    assert code == 1 and "hash_mismatch" in stdout and first["path"] in stdout


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ({"path": "../secret.png", "label": 0, "class_name": "ant", "sha256": "a" * 64}, "contains '..'"),
        ({"path": "/etc/passwd", "label": 0, "class_name": "ant", "sha256": "a" * 64}, "is absolute"),
        ({"path": "ant/img00.png", "label": 0, "class_name": "ant"}, "missing field(s) sha256"),
    ],
)
def test_validate_refuses_bad_manifest_lines(image_tree: Path, tmp_path: Path, capsys, line, needle) -> None:
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(json.dumps(line) + "\n")
    code, stdout, stderr = run(capsys, "data", "validate", image_tree, "--manifest", manifest)
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"saft data validate: error: {manifest}:1:") and needle in stderr


def test_validate_bad_input_exit_2(image_tree: Path, tmp_path: Path, capsys) -> None:
    code, _, stderr = run(capsys, "data", "validate", tmp_path / "nowhere")
    assert code == 2 and "does not exist or is not a directory" in stderr
    code, _, stderr = run(capsys, "data", "validate", image_tree, "--dataset", "coco")
    assert code == 2 and "supported datasets: caltech101, dtd" in stderr and "imagefolder, imagenet" in stderr
    code, _, stderr = run(capsys, "data", "validate", image_tree, "--split", "test")
    assert code == 2 and "dataset 'imagefolder' has no split 'test'; its splits: all" in stderr
    code, _, stderr = run(capsys, "data", "validate", image_tree, "--manifest", tmp_path / "none.jsonl")
    assert code == 2 and f"manifest {tmp_path / 'none.jsonl'} does not exist" in stderr
    code, _, stderr = run(capsys, "data", "validate", "ftp://host/data")
    assert code == 2 and "unsupported scheme 'ftp'" in stderr


# --- parser ------------------------------------------------------------------------------


def _leaf_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                leaves = _leaf_parsers(child)
                found.update({f"{name} {k}".strip(): v for k, v in leaves.items()} or {name: child})
    return found


def test_every_flag_has_help_and_kebab_case() -> None:
    leaves = _leaf_parsers(build_parser())
    assert set(leaves) == {"data prepare", "data validate", "data synth", "data adapters"}
    for name, parser in leaves.items():
        for action in parser._actions:
            assert action.help, f"{name}: {action.dest} has no help"
            for option in action.option_strings:
                assert "_" not in option, f"{name}: {option} is not kebab-case"


def test_help_exits_0(capsys) -> None:
    code, stdout, _ = run(capsys, "data", "prepare", "--help")
    assert code == 0 and "--skip-corrupt" in stdout and "--val-shots" in stdout and "--split" in stdout
    assert "imagenet-sketch" in stdout  # --dataset lists the registry
    code, stdout, _ = run(capsys, "data", "validate", "--help")
    assert code == 0 and "--manifest" in stdout and "1: errors found" in stdout and "--split" in stdout


def test_register_plugs_into_another_parser(image_tree: Path, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="saft")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("other")
    register(sub)
    args = parser.parse_args(["data", "prepare", "--val-shots", "0", str(image_tree), "--out", str(tmp_path / "out"), "--shots", "1"])
    assert args.func(args) == 0
    assert "train images:  4" in capsys.readouterr().out
    args = parser.parse_args(["data", "validate", str(tmp_path / "nowhere")])
    assert args.func(args) == 2


# --- datasets of the adapter registry ----------------------------------------------------


@pytest.fixture
def pets_root(tmp_path: Path) -> Path:
    return write_split_json_tree(tmp_path / "oxford_pets", get_adapter("oxford_pets"))


def test_prepare_a_split_json_dataset_and_split(pets_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "data", "prepare", "--val-shots", "0", pets_root, "--out", out, "--dataset", "oxford_pets",
                               "--shots", "2")
    assert code == 0 and stderr == ""
    assert f"prepared {pets_root} (oxford_pets, split train, subset all, 2 shot(s), seed 1)" in stdout
    assert "classes:       3" in stdout and "train images:  6" in stdout
    assert json.loads((out / "templates.json").read_text()) == ["a photo of a {}, a type of pet."]
    code, stdout, _ = run(capsys, "data", "prepare", "--val-shots", "0", pets_root, "--out", out, "--dataset", "oxford_pets",
                          "--split", "val", "--shots", "1")
    assert code == 0 and "(oxford_pets, split val," in stdout
    record = json.loads((out / "prepare.json").read_text())
    assert (record["dataset"], record["split"]) == ("oxford_pets", "val")
    assert {json.loads(line)["path"] for line in (out / "train.jsonl").read_text().splitlines()} == {
        f"images/{path}" for path, _, _ in split_records("val")
    }


def test_prepare_refuses_evaluation_only_datasets(tmp_path: Path, capsys) -> None:
    code, stdout, stderr = run(capsys, "data", "prepare", "--val-shots", "0", tmp_path, "--out", tmp_path / "out",
                               "--dataset", "imagenet-r")
    assert code == 2 and stdout == ""
    assert stderr.startswith("saft data prepare: error: dataset 'imagenet-r' (ImageNet-R) is evaluation-only")
    assert "Train on 'imagenet'" in stderr
    assert not (tmp_path / "out").exists()


def test_validate_a_split_of_a_dataset(pets_root: Path, capsys, make_image) -> None:
    code, stdout, _ = run(capsys, "data", "validate", pets_root, "--dataset", "oxford_pets")
    assert code == 0
    assert stdout.startswith("oxford_pets, split train: 9 image(s) in 3 of the 3 class(es) this split must cover")
    assert "9 file(s), 3 class(es): OK" in stdout
    break_image(pets_root / "images" / "abyssinian" / "abyssinian_4.jpg")  # the abyssinian test image
    assert run(capsys, "data", "validate", pets_root, "--dataset", "oxford_pets")[0] == 0
    code, stdout, _ = run(capsys, "data", "validate", pets_root, "--dataset", "oxford_pets", "--split", "test")
    assert code == 1 and "images/abyssinian/abyssinian_4.jpg" in stdout and "error corrupt: 1" in stdout
    code, _, stderr = run(capsys, "data", "validate", pets_root, "--dataset", "oxford_pets", "--split", "holdout")
    assert code == 2 and "dataset 'oxford_pets' has no split 'holdout'; its splits: train, val, test" in stderr
    code, _, stderr = run(capsys, "data", "validate", pets_root, "--dataset", "oxford_pets", "--split", "val",
                          "--manifest", pets_root / "m.jsonl")
    assert code == 2 and "give one or the other" in stderr


def test_validate_reports_classes_a_fixed_class_list_misses(tmp_path: Path, capsys) -> None:
    root = write_imagenet_tree(tmp_path / "images", [TENCH])
    code, stdout, _ = run(capsys, "data", "validate", root, "--dataset", "imagenet", "--split", "val")
    assert code == 1
    assert stdout.startswith("imagenet, split val: 2 image(s) in 2 of the 1000 class(es) this split must cover")
    assert "error missing_class: 998 expected class(es) not found" in stdout
    # ImageNet-R must cover its 200 classes, not the 1000 its labels live in.
    r_root = tmp_path / "imagenet-rendition"
    write_distinct_image(r_root / "imagenet-r" / GOLDFISH / "art_0.png", 7)
    code, stdout, _ = run(capsys, "data", "validate", r_root, "--dataset", "imagenet-r")
    assert code == 1 and "error missing_class: 199 expected class(es) not found" in stdout
    assert "imagenet-r, split test: 1 image(s) in 1 of the 200 class(es)" in stdout
    # tench is not an ImageNet-R class: a wrong root is a layout error (exit 2) naming the folder.
    code, _, stderr = run(capsys, "data", "validate", root / "val", "--dataset", "imagenet-r")
    assert code == 2 and f"'{TENCH}'" in stderr and "covers 200 of the 1000 classes" in stderr
