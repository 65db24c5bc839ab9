"""Small generated images and ImageFolder trees shared by the data and reliability tests."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

CLASSES = ("ant", "bee", "cat", "dog")
PER_CLASS = 6


def write_image(path: Path, seed: int, fmt: str | None = None, size: tuple[int, int] = (8, 8)) -> Path:
    """A small image whose pixels depend on ``seed``, so different seeds give different bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size)
    image.putdata([((seed * 37 + i) % 256, (seed * 11 + 3 * i) % 256, (seed * 5 + 7 * i) % 256)
                   for i in range(size[0] * size[1])])
    image.save(path, format=fmt)
    return path


def write_tree(root: Path, size: tuple[int, int] = (8, 8)) -> Path:
    """An ImageFolder root: 4 classes x 6 images, PNG and JPEG mixed, all distinct bytes."""
    seed = 0
    for name in CLASSES:
        for i in range(PER_CLASS):
            write_image(root / name / f"img{i:02d}{'.png' if i % 2 == 0 else '.jpg'}", seed, size=size)
            seed += 1
    return root
