"""Fixtures for the data-layer tests: tiny ImageFolder trees (the S3 endpoint is in tests/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

CLASSES = ("ant", "bee", "cat", "dog")
PER_CLASS = 6


def write_image(path: Path, seed: int, fmt: str | None = None, size: tuple[int, int] = (8, 8)) -> Path:
    """A small image whose pixels depend on ``seed``, so different seeds give different bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size)
    image.putdata([((seed * 37 + i) % 256, (seed * 11 + 3 * i) % 256, (seed * 5 + 7 * i) % 256) for i in range(size[0] * size[1])])
    image.save(path, format=fmt)
    return path


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """An ImageFolder root: 4 classes x 6 images, PNG and JPEG mixed, all distinct bytes."""
    root = tmp_path / "tree"
    seed = 0
    for name in CLASSES:
        for i in range(PER_CLASS):
            ext = ".png" if i % 2 == 0 else ".jpg"
            write_image(root / name / f"img{i:02d}{ext}", seed)
            seed += 1
    return root


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
