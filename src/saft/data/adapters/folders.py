"""The folder layouts: one folder per class, holding that class's images.

Two kinds share this code because they differ only in what a folder's name means:

- ``class-folders``: the name is the class itself (generic ImageFolder: labels follow the
  sorted folder names) or a key of a fixed class list (ImageNet, -Sketch, -A, -R: the
  folder is a wnid and the label is the wnid's position in the sorted 1000-wnid list);
- ``index-folders``: the name is the label, as ImageNet-V2 writes ``0`` .. ``999``.

A split lists candidate folders in the spec (``""`` is the root itself), because these
sets are unpacked both as ``<root>/sketch/<wnid>/`` and as ``<root>/<wnid>/``; the first
candidate holding class folders with images is used. Folders that are not classes of the
set are an error rather than skipped: they mean a wrong root or a wrong adapter, and
dropping them would quietly shrink the evaluation.
"""

from __future__ import annotations

from typing import Callable

from saft.data.adapters.errors import LayoutError
from saft.data.adapters.root_files import examples, join_relpath
from saft.data.adapters.sources import ClassSpace
from saft.data.adapters.spec import DatasetSpec
from saft.data.imagefolder import ImageEntry, ImageFolderIndex, is_image_path
from saft.data.storage import LocalStorage, Storage


def _hidden(part: str) -> bool:
    # Dot-entries (.DS_Store, ._x.jpg, .ipynb_checkpoints) are tool artefacts, never data.
    return part.startswith(".")


def group_class_folders(storage: Storage, location: str, *, include_empty: bool) -> dict[str, list[str]]:
    """Images below ``location/<folder>/`` grouped by folder name, as root-relative paths.

    Files directly in ``location`` and non-image files are ignored; images may sit in
    sub-folders of a class folder. With ``include_empty``, empty class folders of a local
    root are kept (with no images), as :func:`saft.data.scan_image_folder` does.
    """
    groups: dict[str, list[str]] = {}
    if include_empty and isinstance(storage, LocalStorage):
        base = storage.root / location if location else storage.root
        if base.is_dir():
            for child in base.iterdir():
                if child.is_dir() and not _hidden(child.name):
                    groups.setdefault(child.name, [])
    prefix = f"{location}/" if location else ""
    for relpath in storage.list_files(location):
        parts = relpath[len(prefix) :].split("/")
        if len(parts) < 2 or any(_hidden(part) for part in parts):
            continue
        if is_image_path(relpath):
            groups.setdefault(parts[0], []).append(relpath)
    return groups


def _find_split_folder(
    storage: Storage, spec: DatasetSpec, split: str, include_empty: bool
) -> tuple[str, dict[str, list[str]]]:
    candidates = spec.splits[split]
    for location in candidates:
        groups = group_class_folders(storage, location, include_empty=include_empty)
        if any(groups.values()):
            return location, groups
    looked = ", ".join(storage.uri_for(join_relpath(c, "<class>/")) for c in candidates)
    raise LayoutError(
        f"{spec.name}: no class folders with images for split {split!r}; looked in {looked}. "
        f"Expected layout: {spec.layout_hint}"
    )


def _index_label(folder: str, size: int) -> int | None:
    """The label a folder named by its index stands for (``"7"`` -> 7), or None."""
    if not folder.isdigit() or str(int(folder)) != folder:
        return None
    label = int(folder)
    return label if label < size else None


def scan_folders(
    storage: Storage,
    spec: DatasetSpec,
    split: str,
    space: ClassSpace | None,
    subset: tuple[int, ...] | None,
) -> ImageFolderIndex:
    """Index one split of a folder-layout root (``space`` is None for folder-name classes)."""
    location, groups = _find_split_folder(storage, spec, split, include_empty=space is None)
    where = storage.uri_for(location) if location else storage.uri
    if space is None:
        classes = tuple(sorted(groups))
        labels = {folder: label for label, folder in enumerate(classes)}
    else:
        classes = space.names
        if spec.layout == "index-folders":
            label_of: Callable[[str], int | None] = lambda folder: _index_label(folder, len(space.names))
            what = f"class indices 0..{len(space.names) - 1}"
        else:
            label_of = space.label_of
            what = "class keys (wnids) of this dataset"
        allowed = set(subset) if subset is not None else None
        labels = {}
        unknown: list[str] = []
        for folder, files in groups.items():
            label = label_of(folder)
            if files and (label is None or (allowed is not None and label not in allowed)):
                unknown.append(folder)
            elif label is not None:
                labels[folder] = label
        if unknown:
            scope = f" (this set covers {len(allowed)} of the {len(classes)} classes)" if allowed is not None else ""
            raise LayoutError(
                f"{spec.name}: {len(unknown)} folder(s) under {where} are not {what}{scope}: "
                f"{examples(sorted(unknown))}. Is the root right for this dataset? Expected layout: {spec.layout_hint}"
            )
    entries = sorted(
        (
            ImageEntry(path=path, label=labels[folder], class_name=classes[labels[folder]])
            for folder, files in groups.items()
            if folder in labels
            for path in files
        ),
        key=lambda entry: entry.path,
    )
    return ImageFolderIndex(root=storage.uri, classes=tuple(classes), entries=tuple(entries))


def folder_class_names(storage: Storage, spec: DatasetSpec) -> tuple[str, ...]:
    """Class names of a folder-name root: the sorted folders of its default split."""
    _, groups = _find_split_folder(storage, spec, spec.default_split, include_empty=True)
    return tuple(sorted(groups))
