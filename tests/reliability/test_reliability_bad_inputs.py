"""Bad inputs are refused with an error naming the culprit, and leave no partial output.

One test per kind of bad input of issue 7: broken image files, an empty class, a manifest
whose classes disagree with the class list, a density outside (0, 1], a mask or delta
made for another base model, and a manifest entry that escapes its root.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from synthetic import CLASS_NAMES, make_dataset

import saft
from saft.data.dataset import ManifestDataset
from saft.data.imagefolder import ImageEntry
from saft.data.images import ImageDecodeError
from saft.data.manifest import ManifestEntry, ManifestError, read_manifest
from saft.data.paths import UnsafePathError
from saft.data.prepare import prepare_dataset
from saft.data.storage import S3Storage
from saft.data.validate import DataValidationError
from saft.steps.score import ScoreConfig, score_step

torch.set_num_threads(1)


def _identity(image):
    return image


# --- broken image files ------------------------------------------------------------------------


def test_prepare_names_every_broken_file_and_writes_nothing(image_tree: Path, tmp_path: Path) -> None:
    # prepare reads only what it draws: these three are among the 2 shots seed 1 draws per class.
    good = (image_tree / "ant" / "img01.jpg").read_bytes()
    (image_tree / "ant" / "img03.jpg").write_bytes(good[:20] + b"\x00garbage" * 10)  # corrupt
    (image_tree / "bee" / "img03.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (image_tree / "cat" / "img02.png").write_bytes(b"")  # zero bytes
    out = tmp_path / "prepared"
    with pytest.raises(DataValidationError) as caught:
        prepare_dataset(image_tree, out, shots=2, val_shots=0)
    text = str(caught.value)
    for culprit in ("ant/img03.jpg", "bee/img03.jpg", "cat/img02.png"):
        assert culprit in text
    assert "zero_byte" in text and "corrupt" in text
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncated", "zero_byte", "garbage"])
def test_reading_a_file_damaged_after_prepare_names_it_and_the_manifest(image_tree: Path, tmp_path: Path,
                                                                        damage: str) -> None:
    prepare_dataset(image_tree, tmp_path / "p", shots=2, val_shots=0)
    manifest = tmp_path / "p" / "train.jsonl"
    dataset = ManifestDataset(manifest, image_tree, _identity, verify_hash=False)
    victim = image_tree / dataset.entries[0].path
    data = victim.read_bytes()
    victim.write_bytes({"truncated": data[: len(data) // 2], "zero_byte": b"", "garbage": b"not an image"}[damage])
    with pytest.raises(ImageDecodeError, match=rf"{dataset.entries[0].path}.*train\.jsonl"):
        dataset[0]


# --- classes -------------------------------------------------------------------------------------


def test_prepare_refuses_an_empty_class(image_tree: Path, tmp_path: Path) -> None:
    (image_tree / "emu").mkdir()
    out = tmp_path / "prepared"
    with pytest.raises(DataValidationError, match=r"(?s)empty_class.*emu"):
        prepare_dataset(image_tree, out, shots=2, val_shots=0)
    assert not out.exists()


def test_manifest_classes_must_match_the_class_list(image_tree: Path, tmp_path: Path) -> None:
    prepare_dataset(image_tree, tmp_path / "p", shots=2, val_shots=0)
    manifest = tmp_path / "p" / "train.jsonl"
    classes = json.loads((tmp_path / "p" / "classes.json").read_text())
    assert len(ManifestDataset(manifest, image_tree, _identity, classes=classes)) == 8

    swapped = [classes[1], classes[0], *classes[2:]]  # e.g. classes.json from another prepare run
    with pytest.raises(ManifestError, match=r"train\.jsonl: label 0 is class 'ant' in the manifest but 'bee'"):
        ManifestDataset(manifest, image_tree, _identity, classes=swapped)
    with pytest.raises(ManifestError, match=r"label 3 \(class 'dog'\) is outside the class list of 3"):
        ManifestDataset(manifest, image_tree, _identity, classes=classes[:3])
    # Disambiguated keys of repeated names ("missile (n03773504)") match their plain name.
    keyed = [ManifestEntry(e.path, e.label, f"{e.class_name} (id{e.label})", e.sha256) for e in read_manifest(manifest)]
    assert len(ManifestDataset(keyed, image_tree, _identity, classes=classes)) == 8


def test_trainer_refuses_labels_beyond_its_prompts(vit, image_tree: Path, tmp_path: Path) -> None:
    prepare_dataset(image_tree, tmp_path / "p", shots=2, val_shots=0)
    dataset = ManifestDataset(tmp_path / "p" / "train.jsonl", image_tree, vit.preprocess)
    prompts = saft.ClassPrompts.build(vit.tokenizer, ["ant", "bee"])  # 4 classes in the data
    with pytest.raises(ValueError, match=r"label 3 \('dog'\).*2 class\(es\)"):
        saft.finetune(vit.model, dataset, prompts, config=saft.FinetuneConfig(method="full", steps=1), progress=False)


# --- density -------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_density_outside_unit_interval_is_refused_before_anything_is_written(image_tree: Path, tmp_path: Path,
                                                                             density: float) -> None:
    prepare_dataset(image_tree, tmp_path / "p", shots=2, val_shots=0)
    out = tmp_path / "score"
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        score_step(ScoreConfig(model="saft-tiny-vit", kind="random", density=density), tmp_path / "p", out, log=None)
    assert not out.exists()
    shapes = {"w": (10, 10)}
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        saft.random_mask(shapes, density)


# --- another base model --------------------------------------------------------------------------


def test_mask_from_another_base_is_refused_by_the_trainer(vit) -> None:
    other = saft.load_model("saft-tiny-vit", seed=1)
    shapes = {n: tuple(p.shape) for n, p in saft.Eligibility().select(other.model).items()}
    mask = saft.random_mask(shapes, 0.01, meta={"base_model": "saft-tiny-vit@seed1", "base_fingerprint": other.fingerprint})
    prompts = saft.ClassPrompts.build(vit.tokenizer, CLASS_NAMES)
    with pytest.raises(ValueError, match=r"mask was scored on another base model \(saft-tiny-vit@seed1"):
        saft.finetune(vit.model, make_dataset(8), prompts, mask=mask, config=saft.FinetuneConfig(steps=1),
                      progress=False)
    assert saft.fingerprint_model(vit.model) == vit.fingerprint


def test_delta_file_for_another_base_is_refused(vit, tmp_path: Path) -> None:
    other = saft.load_model("saft-tiny-vit", seed=1)
    prompts = saft.ClassPrompts.build(other.tokenizer, CLASS_NAMES)
    result = saft.finetune(other.model, make_dataset(8), prompts, config=saft.FinetuneConfig(method="full", steps=1,
                                                                                             batch_size=4),
                           progress=False)
    path = saft.save_delta(result.delta, tmp_path / "delta.safetensors")
    with pytest.raises(saft.FingerprintMismatch):
        saft.apply_delta(vit.model, saft.load_delta(path))
    assert saft.fingerprint_model(vit.model) == vit.fingerprint  # nothing half-applied


# --- entries escaping their root -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["../outside.png", "/etc/passwd", "ant/../../outside.png"])
def test_manifest_line_escaping_the_root_is_refused(tmp_path: Path, path: str) -> None:
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps({"path": path, "label": 0, "class_name": "ant", "sha256": "0" * 64}) + "\n")
    with pytest.raises(ManifestError, match=rf"train\.jsonl:1: field 'path'"):
        read_manifest(manifest)


def test_symlink_escaping_the_root_is_refused_at_read_time(image_tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes((image_tree / "ant" / "img00.png").read_bytes())
    (image_tree / "ant" / "link.png").symlink_to(outside)
    dataset = ManifestDataset([ImageEntry("ant/link.png", 0, "ant")], image_tree, _identity, verify_hash=False)
    with pytest.raises(UnsafePathError, match="outside the dataset root"):
        dataset[0]


def test_s3_keys_stay_under_the_configured_prefix() -> None:
    storage = S3Storage("s3://bucket/datasets/pets")
    for bad in ("../other/secret.png", "/datasets/x.png", "a/../../b.png"):
        with pytest.raises(UnsafePathError):
            storage.read_bytes(bad)
        with pytest.raises(UnsafePathError):
            storage.fetch(bad)
    assert storage._client is None  # refused before any request was made
