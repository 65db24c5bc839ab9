"""Fixtures for the data-layer tests: tiny ImageFolder trees (the S3 endpoint is in tests/conftest.py)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Callable

import pytest
from image_trees import write_image, write_tree
from PIL import Image

WIDE_CLASSES = 1000
WIDE_PER_CLASS = 4


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "tree")


@pytest.fixture
def make_image() -> Callable[..., Path]:
    return write_image


def upload_tree(client, bucket: str, root: Path, prefix: str) -> None:
    """Copy a local tree to s3://bucket/prefix/ (relative paths kept)."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(root).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


@pytest.fixture
def upload() -> Callable[..., None]:
    return upload_tree


@pytest.fixture
def copy_tree() -> Callable[[Path, Path], Path]:
    def copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst, symlinks=True)
        return dst

    return copy


def write_wide_tree(root: Path, classes: int = WIDE_CLASSES, per_class: int = WIDE_PER_CLASS) -> Path:
    """``classes`` class folders ``c0000``... with ``per_class`` 4x4 BMPs each, all distinct bytes.

    BMP pixels are stored raw, so the files are one encoded header plus a colour per image:
    thousands of them are written in about a second, and each decodes like any image.
    """
    header = io.BytesIO()
    Image.new("RGB", (4, 4)).save(header, format="BMP")
    head = header.getvalue()[: int.from_bytes(header.getvalue()[10:14], "little")]
    number = 0
    for label in range(classes):
        folder = root / f"c{label:04d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{i}.bmp").write_bytes(head + number.to_bytes(3, "big") * 16)
            number += 1
    return root


@pytest.fixture(scope="module")
def wide_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet's class count in miniature: 1000 classes x 4 images (tests must leave it as they found it)."""
    return write_wide_tree(tmp_path_factory.mktemp("wide") / "tree")
