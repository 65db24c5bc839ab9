"""The generic ImageFolder layout: ``<root>/<class name>/**/<image>``.

Most downloaded datasets can be arranged this way, so it is the one adapter every
dataset spec can fall back on. Labels are positions in the sorted list of class folder
names (plain code-point order), which is the same on every machine and filesystem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from saft.data.storage import LocalStorage, Storage, open_storage

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


@dataclass(frozen=True)
class ImageEntry:
    """One image of a dataset: where it is (relative to the root) and what it shows."""

    path: str
    label: int
    class_name: str


@dataclass(frozen=True)
class ImageFolderIndex:
    """The classes of a root (label = position) and its images, sorted by path."""

    root: str
    classes: tuple[str, ...]
    entries: tuple[ImageEntry, ...]

    def counts(self) -> dict[str, int]:
        """Images per class, zero for class folders that hold no image."""
        counts = {name: 0 for name in self.classes}
        for entry in self.entries:
            counts[entry.class_name] += 1
        return counts


def is_image_path(relpath: str) -> bool:
    """True for the image extensions the adapter reads (case-insensitive)."""
    return os.path.splitext(relpath)[1].lower() in IMAGE_EXTENSIONS


def _hidden(part: str) -> bool:
    # Dot-folders and dot-files (.DS_Store, .ipynb_checkpoints, ._x.jpg) are tool
    # artefacts, never classes or samples.
    return part.startswith(".")


def scan_image_folder(root: str | os.PathLike | Storage) -> ImageFolderIndex:
    """List the classes and images of an ImageFolder root (local path or ``s3://``).

    Files directly under the root and files without an image extension are ignored.
    On local roots an empty class folder still counts as a class, so validation can
    report it; object stores have no empty folders.
    """
    storage = open_storage(root)
    class_files: dict[str, list[str]] = {}
    if isinstance(storage, LocalStorage):
        for child in storage.root.iterdir():
            if child.is_dir() and not _hidden(child.name):
                class_files.setdefault(child.name, [])
    for relpath in storage.list_files():
        parts = relpath.split("/")
        if len(parts) < 2 or any(_hidden(part) for part in parts):
            continue
        class_files.setdefault(parts[0], [])
        if is_image_path(relpath):
            class_files[parts[0]].append(relpath)
    classes = tuple(sorted(class_files))
    entries = tuple(
        sorted(
            (
                ImageEntry(path=relpath, label=label, class_name=name)
                for label, name in enumerate(classes)
                for relpath in class_files[name]
            ),
            key=lambda entry: entry.path,
        )
    )
    return ImageFolderIndex(root=storage.uri, classes=classes, entries=entries)

