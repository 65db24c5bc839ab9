"""Fixtures for the data-layer tests: tiny ImageFolder trees (the S3 endpoint is in tests/conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
from image_trees import write_image, write_tree


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
