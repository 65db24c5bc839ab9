"""prepare reads what it draws.

On 1000 generated classes (ImageNet's count) the step reads (shots + val_shots) x classes
images, each once, and gives the manifests the earlier path gave (check every image of
the split, drop the broken ones, draw, hash); broken drawn images are replaced by the next
ones of their class in the seeded order, the same way on every run.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

from saft.data.fewshot import select_few_shot, shot_order
from saft.data.imagefolder import scan_image_folder
from saft.data.manifest import canonical_manifest_bytes, hash_entries, read_manifest
from saft.data.prepare import prepare_dataset
from saft.data.storage import LocalStorage
from saft.data.validate import DataValidationError, skip_corrupt, validate_dataset
from test_data_prepare import break_image, snapshot

SHOTS, VAL_SHOTS, SEED = 1, 1, 3
NEED = SHOTS + VAL_SHOTS


class CountingStorage(LocalStorage):
    """A local root that counts every read of a file's bytes, and every fetch."""

    def __init__(self, root: Path, extra: tuple[str, ...] = ()) -> None:
        super().__init__(root)
        self.reads: Counter[str] = Counter()
        self.fetches = 0
        self._extra = extra  # listed but not on disk (e.g. keys an object store holds)
        self._lock = threading.Lock()

    def list_files(self, prefix: str = "") -> list[str]:
        return sorted(super().list_files(prefix) + list(self._extra))

    def read_bytes(self, relpath: str) -> bytes:
        with self._lock:
            self.reads[relpath] += 1
        return super().read_bytes(relpath)

    def fetch(self, relpath: str, expected_sha256: str | None = None) -> Path:
        with self._lock:
            self.fetches += 1
        return super().fetch(relpath, expected_sha256)


def drawn_paths(out: Path) -> list[str]:
    files = ["train.jsonl"] + (["val.jsonl"] if (out / "val.jsonl").exists() else [])
    return [entry.path for name in files for entry in read_manifest(out / name)]


def previous_path(root: Path, shots: int, val_shots: int, broken: frozenset[str] = frozenset()) -> tuple[bytes, bytes]:
    """train.jsonl and val.jsonl as prepare made them when it checked the whole split first:
    validate every image, drop the broken ones (skip_corrupt), draw, hash."""
    check = validate_dataset(root, progress=False)
    assert check.report.bad_paths() == broken
    entries = skip_corrupt(check.entries, check.report) if broken else list(check.entries)
    split = select_few_shot(entries, shots, SEED, val_shots=val_shots, classes=check.keys)
    return canonical_manifest_bytes(hash_entries(root, split.train)), canonical_manifest_bytes(
        hash_entries(root, split.val)
    )


def test_prepare_reads_only_the_drawn_images(wide_tree: Path, tmp_path: Path) -> None:
    storage = CountingStorage(wide_tree)
    out = tmp_path / "out"
    result = prepare_dataset(storage, out, shots=SHOTS, val_shots=VAL_SHOTS, seed=SEED)
    drawn = drawn_paths(out)
    assert len(drawn) == NEED * 1000 == len(set(drawn))
    assert set(storage.reads) == set(drawn) and set(storage.reads.values()) == {1}  # each drawn image read once
    assert storage.fetches == 0  # and nothing read a second way
    assert result.record["counts"] == {
        "classes": 1000, "images": 4000, "read": 2000, "skipped_broken": 0, "train": 1000, "val": 1000
    }
    # The same manifests as checking all 4000 images first, then drawing and hashing.
    train, val = previous_path(wide_tree, SHOTS, VAL_SHOTS)
    assert (out / "train.jsonl").read_bytes() == train and (out / "val.jsonl").read_bytes() == val


@pytest.fixture
def broken_wide_tree(wide_tree: Path) -> Iterator[tuple[Path, dict[str, list[str]], frozenset[str]]]:
    """The wide tree with drawn images broken in 12 classes (restored afterwards).

    Returns the root, each class's sampling order for SEED and the broken paths: classes
    c0000-c0009 lose their training pick, c0010 both picks, c0011 its validation pick and
    the image after it (a replacement that is broken too), and c0012 an image never drawn.
    All get the same garbage bytes: copies of one broken file in several classes are no
    label conflict, since none of them is used.
    """
    index = scan_image_folder(wide_tree)
    order = {
        name: [entry.path for entry in shot_order([e for e in index.entries if e.class_name == name], SEED)]
        for name in index.classes
    }
    broken = [order[f"c{c:04d}"][0] for c in range(10)]
    broken += order["c0010"][:2] + order["c0011"][1:3] + order["c0012"][3:]
    saved = {path: (wide_tree / path).read_bytes() for path in broken}
    for path in broken:
        break_image(wide_tree / path)
    try:
        yield wide_tree, order, frozenset(broken)
    finally:
        for path, data in saved.items():
            (wide_tree / path).write_bytes(data)


def test_broken_drawn_images_are_refused_or_replaced_deterministically(broken_wide_tree, tmp_path: Path,
                                                                         caplog) -> None:
    root, order, broken = broken_wide_tree
    storage = CountingStorage(root)
    with pytest.raises(DataValidationError, match="--skip-corrupt") as caught:
        prepare_dataset(storage, tmp_path / "refused", shots=SHOTS, val_shots=VAL_SHOTS, seed=SEED)
    first_round = {path for path in broken if path not in (order["c0011"][2], order["c0012"][3])}
    assert caught.value.report.bad_paths() == first_round
    assert "13 of the 2000 drawn image(s) are broken" in str(caught.value)
    assert "replace each with the next image of its class" in str(caught.value)
    assert sum(storage.reads.values()) == 2000 and not (tmp_path / "refused").exists()

    storage = CountingStorage(root)
    with caplog.at_level(logging.WARNING, logger="saft.data.prepare"):
        first = prepare_dataset(storage, tmp_path / "a", shots=SHOTS, val_shots=VAL_SHOTS, seed=SEED, skip_corrupt=True)
    assert "replaced 14 broken drawn image(s)" in caplog.text
    # Each broken pick cost one more read: the next image of its class (c0011: two more).
    assert sum(storage.reads.values()) == 2000 + 14 and set(storage.reads.values()) == {1}
    assert first.skipped == 14 and first.record["counts"]["read"] == 2014
    picks = set(drawn_paths(tmp_path / "a"))
    assert {order["c0000"][2], order["c0010"][2], order["c0010"][3], order["c0011"][3]} <= picks
    assert not picks & broken

    prepare_dataset(root, tmp_path / "b", shots=SHOTS, val_shots=VAL_SHOTS, seed=SEED, skip_corrupt=True)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    train, val = previous_path(root, SHOTS, VAL_SHOTS, broken)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == train and (tmp_path / "a" / "val.jsonl").read_bytes() == val
    # A 2-shot draw holds the 1-shot one: the first two usable images of each class.
    prepare_dataset(root, tmp_path / "two", shots=2, seed=SEED, skip_corrupt=True, val_shots=0)
    assert sorted(drawn_paths(tmp_path / "two")) == sorted(picks)


def test_a_class_left_with_too_few_readable_images_is_refused(image_tree: Path, tmp_path: Path) -> None:
    for name in ("img02.png", "img03.jpg"):  # bee's first two in seed 1's order
        break_image(image_tree / "bee" / name)
    with pytest.raises(DataValidationError, match=r"1 class\(es\) have fewer than 5 readable images.*'bee' \(4\)"):
        prepare_dataset(image_tree, tmp_path / "out", shots=5, skip_corrupt=True, val_shots=0)
    assert not (tmp_path / "out").exists()


def test_unsafe_listed_paths_are_refused_or_left_out(image_tree: Path, tmp_path: Path) -> None:
    storage = CountingStorage(image_tree, extra=("bee//sneaky.png",))
    with pytest.raises(DataValidationError, match="lists paths that leave the dataset root") as caught:
        prepare_dataset(storage, tmp_path / "out", shots=2, val_shots=0)
    assert caught.value.report.bad_paths() == {"bee//sneaky.png"} and not storage.reads
    result = prepare_dataset(storage, tmp_path / "out", shots=2, skip_corrupt=True, val_shots=0)
    assert result.skipped == 1 and "bee//sneaky.png" not in storage.reads
    assert "sneaky" not in (tmp_path / "out" / "train.jsonl").read_text()


def test_duplicates_among_the_drawn_images(image_tree: Path, tmp_path: Path, caplog) -> None:
    # ant/img03.jpg and ant/img00.png are ant's two picks at 2 shots, seed 1: a repeat within a class warns.
    shutil.copy(image_tree / "ant" / "img03.jpg", image_tree / "ant" / "img00.png")
    with caplog.at_level(logging.WARNING, logger="saft.data.prepare"):
        prepare_dataset(image_tree, tmp_path / "out", shots=2, val_shots=0)
    assert "duplicate ant/img00.png (same bytes as ant/img03.jpg)" in caplog.text


def test_prepare_from_s3_caches_only_the_drawn_images(image_tree: Path, tmp_path: Path, s3_bucket, upload) -> None:
    client, bucket = s3_bucket
    upload(client, bucket, image_tree, "tree")
    prepare_dataset(f"s3://{bucket}/tree", tmp_path / "out", shots=2, val_shots=1)
    drawn = read_manifest(tmp_path / "out" / "train.jsonl") + read_manifest(tmp_path / "out" / "val.jsonl")
    cache = Path(tmp_path / "blob-cache")  # SAFT_CACHE_DIR of the S3 fixture
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == sorted(e.sha256 for e in drawn)
    assert len(drawn) == 12  # of the root's 24 images
