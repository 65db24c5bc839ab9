"""Fixtures for the reliability tests: a small ImageFolder tree with distinct images per file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

CLASSES = ("ant", "bee", "cat", "dog")
PER_CLASS = 6

torch.set_num_threads(1)  # the test machine is shared


def write_image(path: Path, seed: int, size: tuple[int, int] = (16, 16), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size)
    image.putdata([((seed * 37 + i) % 256, (seed * 11 + 3 * i) % 256, (seed * 5 + 7 * i) % 256)
                   for i in range(size[0] * size[1])])
    image.save(path, format=fmt)
    return path


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """4 classes x 6 images, PNG and JPEG mixed, all distinct bytes."""
    root = tmp_path / "tree"
    seed = 0
    for name in CLASSES:
        for i in range(PER_CLASS):
            write_image(root / name / f"img{i:02d}{'.png' if i % 2 == 0 else '.jpg'}", seed)
            seed += 1
    return root
