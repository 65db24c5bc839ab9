"""ManifestDataset: manifest + root + transform gives (tensor, label), broken files handled."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from saft.data.dataset import ManifestDataset
from saft.data.fewshot import select_few_shot
from saft.data.imagefolder import scan_image_folder
from saft.data.manifest import hash_entries, write_manifest
from saft.data.storage import ChecksumMismatchError
from saft.data.validate import DataValidationError


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.resize((4, 4)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


@pytest.fixture
def manifest(image_tree: Path, tmp_path: Path) -> Path:
    split = select_few_shot(scan_image_folder(image_tree).entries, 3, seed=0)
    path = tmp_path / "train.jsonl"
    write_manifest(path, hash_entries(image_tree, split.train))
    return path


def test_items_and_loader(manifest: Path, image_tree: Path) -> None:
    dataset = ManifestDataset(manifest, image_tree, to_tensor)
    assert len(dataset) == 12
    image, label = dataset[0]
    assert image.shape == (3, 4, 4) and image.dtype == torch.float32
    assert label == dataset.entries[0].label and dataset.entries[0].class_name == "ant"
    expected = to_tensor(Image.open(image_tree / dataset.entries[0].path).convert("RGB"))
    assert torch.equal(image, expected)
    assert dataset.class_names == {0: "ant", 1: "bee", 2: "cat", 3: "dog"}
    batches = list(DataLoader(dataset, batch_size=5))
    assert [b[0].shape[0] for b in batches] == [5, 5, 2]
    assert torch.cat([b[1] for b in batches]).tolist() == [e.label for e in dataset.entries]


def test_gray_images_become_rgb(image_tree: Path, tmp_path: Path) -> None:
    Image.new("L", (6, 6), 128).save(image_tree / "ant" / "gray.png")
    entries = hash_entries(image_tree, [e for e in scan_image_folder(image_tree).entries if e.path == "ant/gray.png"])
    tensor, _ = ManifestDataset(entries, image_tree, to_tensor)[0]
    assert tensor.shape == (3, 4, 4)


def test_changed_file_is_refused(manifest: Path, image_tree: Path) -> None:
    dataset = ManifestDataset(manifest, image_tree, to_tensor)
    victim = image_tree / dataset.entries[1].path
    victim.write_bytes((image_tree / dataset.entries[2].path).read_bytes())
    with pytest.raises(ChecksumMismatchError, match=dataset.entries[1].path):
        dataset[1]
    unchecked = ManifestDataset(manifest, image_tree, to_tensor, verify_hash=False)
    assert unchecked[1][1] == dataset.entries[1].label


def test_corrupt_file_raises_naming_it(manifest: Path, image_tree: Path) -> None:
    dataset = ManifestDataset(manifest, image_tree, to_tensor, verify_hash=False)
    (image_tree / dataset.entries[0].path).write_bytes(b"garbage")
    with pytest.raises(OSError, match=rf"{dataset.entries[0].path}.*train\.jsonl.*skip_corrupt"):
        dataset[0]


def test_skip_corrupt_drops_broken_entries(manifest: Path, image_tree: Path, caplog) -> None:
    full = ManifestDataset(manifest, image_tree, to_tensor)
    (image_tree / full.entries[0].path).write_bytes(b"")
    (image_tree / full.entries[5].path).unlink()
    with caplog.at_level(logging.WARNING):
        dataset = ManifestDataset(manifest, image_tree, to_tensor, skip_corrupt=True)
    assert len(dataset) == 10
    assert full.entries[0] not in dataset.entries and full.entries[5] not in dataset.entries
    assert "skipped 2 of 12 entries" in caplog.text
    assert all(dataset[i][0].shape == (3, 4, 4) for i in range(len(dataset)))


def test_skip_corrupt_refuses_to_lose_a_class(manifest: Path, image_tree: Path) -> None:
    full = ManifestDataset(manifest, image_tree, to_tensor)
    for entry in full.entries:
        if entry.class_name == "bee":
            (image_tree / entry.path).write_bytes(b"")
    with pytest.raises(DataValidationError, match="'bee' with no image"):
        ManifestDataset(manifest, image_tree, to_tensor, skip_corrupt=True)


def test_s3_backed_dataset_pickles(s3_bucket, image_tree: Path, manifest: Path, upload) -> None:
    client, bucket = s3_bucket
    upload(client, bucket, image_tree, "tree")
    dataset = ManifestDataset(manifest, f"s3://{bucket}/tree", to_tensor)
    local = ManifestDataset(manifest, image_tree, to_tensor)
    assert torch.equal(dataset[3][0], local[3][0])
    clone = pickle.loads(pickle.dumps(dataset))  # what DataLoader workers receive under spawn
    assert torch.equal(clone[4][0], local[4][0]) and clone[4][1] == local[4][1]


def test_s3_reads_go_through_the_cache(s3_bucket, image_tree: Path, manifest: Path, upload) -> None:
    client, bucket = s3_bucket
    upload(client, bucket, image_tree, "tree")
    dataset = ManifestDataset(manifest, f"s3://{bucket}/tree", to_tensor, verify_hash=False)
    first = dataset[0]
    client.delete_object(Bucket=bucket, Key=f"tree/{dataset.entries[0].path}")
    again = dataset[0]  # served from the blob cache, no request needed
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
