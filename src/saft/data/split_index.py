"""One split of a named dataset as its adapter lists it, with the checks that need no image bytes.

Listing a split is cheap (object listings, index files); reading its images is not:
ImageNet's training split is 1.28 million files, on S3 each one a request. So the checks
that only need the listing are made here, for every image of the split, and reading is
left to whoever needs the bytes: ``saft data validate`` reads them all
(:func:`saft.data.validate.validate_dataset`), ``saft data prepare`` only those it draws
(:mod:`saft.data.drawn`).

Checks made from the listing alone (:attr:`DatasetIndex.problems`): classes the split must
cover but holds no image of (``missing_class``), classes outside the dataset's list
(``extra_class``), ImageFolder class folders without images (``empty_class``), and paths
that are absolute, climb out with ``..`` or are not in normal form (``unsafe_path``). A
label that disagrees with the class list is a damaged index and raises
:class:`~saft.data.adapters.LayoutError`. A symlink that leaves a local root is only
seen when the file is read.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from saft.data.adapters import AdapterError, DatasetAdapter, LayoutError, get_adapter
from saft.data.adapters.sources import load_class_space
from saft.data.findings import Finding
from saft.data.imagefolder import ImageEntry, ImageFolderIndex, scan_image_folder
from saft.data.manifest import LabelledPath
from saft.data.paths import UnsafePathError, check_relpath
from saft.data.storage import Storage, open_storage


def class_keys(classes: Sequence[str], ids: Sequence[str] | None = None) -> tuple[str, ...]:
    """One distinct name per label: the class name, or ``"<name> (<id>)"`` where names repeat.

    Grouping images by class name is how validation, ``skip_corrupt``, the few-shot draw
    and manifests tell classes apart, but a fixed class list may repeat a name: CLIP's
    ImageNet names call two classes "missile" and two "sunglasses". Keying those by name
    would merge two classes (and their shots) into one, so each gets a key that adds its
    id (``ids[label]``, e.g. the wnid: ``"missile (n03773504)"``), or ``label N`` without
    ids. Unique names are their own key, so datasets without repeats are unaffected.
    """
    counts: dict[str, int] = {}
    for name in classes:
        counts[name] = counts.get(name, 0) + 1
    keys = tuple(
        name if counts[name] == 1 else f"{name} ({ids[label] if ids is not None else f'label {label}'})"
        for label, name in enumerate(classes)
    )
    clashes = sorted(key for key, n in Counter(keys).items() if n > 1)
    if clashes:
        raise AdapterError(
            f"the class list has names that cannot be told apart even with their ids: {', '.join(clashes[:5])}; "
            "rename those classes"
        )
    return keys


def reads_root_as_image_folder(adapter: DatasetAdapter, split: str) -> bool:
    """True when ``split`` of this dataset is the root itself laid out as ``<root>/<class>/<image>``.

    Such a root is checked as a whole (:func:`saft.data.validate.validate_root` without
    entries): its class folders define the classes, so a class folder without images can
    only be seen by listing the folders, which an index of images cannot show.
    """
    spec = adapter.spec
    return spec.layout == "class-folders" and spec.classes.source == "folder-names" and spec.splits[split] == ("",)


def empty_class_findings(index: ImageFolderIndex) -> list[Finding]:
    """``empty_class`` for every class folder of an ImageFolder index that holds no image."""
    return [Finding("empty_class", name) for name, n in index.counts().items() if n == 0]


def class_findings(found: Iterable[str], expected: Sequence[str] | None) -> list[Finding]:
    """``missing_class`` / ``extra_class`` where the classes ``found`` differ from ``expected``."""
    if expected is None:
        return []
    have, want = set(found), set(expected)
    return [Finding("missing_class", name) for name in sorted(want - have)] + [
        Finding("extra_class", name) for name in sorted(have - want)
    ]


def unsafe_path_findings(entries: Iterable[LabelledPath]) -> list[Finding]:
    """``unsafe_path`` for every entry whose path is not a clean relative path (no read needed)."""
    found: list[Finding] = []
    for entry in entries:
        try:
            check_relpath(entry.path)
        except UnsafePathError as err:
            found.append(Finding("unsafe_path", entry.path, str(err)))
    return found


@dataclass(frozen=True)
class DatasetIndex:
    """One split of a dataset as its adapter lists it, and what the listing alone shows.

    ``entries`` carry the class *key* (see :func:`class_keys`) as ``class_name`` and the
    label in the dataset's label space (ImageNet-A images keep their 1000-class labels);
    ``classes`` holds the real names in label order, ``keys`` the key of each label,
    ``expected`` the keys of the classes the split must cover, ``listed`` the sorted keys
    the listing shows (an ImageFolder root: every class folder, empty ones included;
    otherwise the keys with images) and ``problems`` the findings of the checks that need
    no image bytes (module docstring).
    """

    dataset: str
    split: str
    root: str
    classes: tuple[str, ...]
    keys: tuple[str, ...]
    entries: tuple[ImageEntry, ...]
    expected: tuple[str, ...]
    listed: tuple[str, ...]
    problems: tuple[Finding, ...]

    @property
    def name_of_key(self) -> dict[str, str]:
        """Class key -> the class name prompts use."""
        return dict(zip(self.keys, self.classes))


def _resolve_adapter(dataset: str | DatasetAdapter) -> DatasetAdapter:
    return get_adapter(dataset) if isinstance(dataset, str) else dataset


def index_dataset(
    root: str | os.PathLike | Storage, dataset: str | DatasetAdapter = "imagefolder", split: str | None = None
) -> DatasetIndex:
    """List ``split`` (default: the dataset's default split) of ``root`` and check what needs no bytes.

    The classes the split must cover are the dataset's (for ImageNet-A/-R, the 200 it
    covers). A plain ImageFolder root is listed as a whole: its class folders are its
    classes. Raises :class:`~saft.data.adapters.AdapterError` for an unknown dataset or
    split, or a root that does not match the layout.
    """
    adapter = _resolve_adapter(dataset)
    split = adapter.default_split if split is None else split
    if split not in adapter.splits:
        raise AdapterError(f"dataset {adapter.name!r} has no split {split!r}; its splits: {', '.join(adapter.splits)}")
    storage = open_storage(root)
    if reads_root_as_image_folder(adapter, split):
        folder = scan_image_folder(storage)
        problems = empty_class_findings(folder) + unsafe_path_findings(folder.entries)
        return DatasetIndex(adapter.name, split, storage.uri, folder.classes, folder.classes, folder.entries,
                            folder.classes, folder.classes, tuple(problems))

    index = adapter.scan(storage, split)
    classes = tuple(adapter.class_names(storage))
    if classes != index.classes:
        raise LayoutError(
            f"{adapter.name}: the class list of {storage.uri} changed while it was being read; "
            "check again once the dataset is no longer being written"
        )
    ids = load_class_space(adapter.spec.classes).keys if adapter.has_fixed_classes else None
    keys = class_keys(classes, ids)
    entries = []
    for entry in index.entries:
        if not 0 <= entry.label < len(classes) or classes[entry.label] != entry.class_name:
            raise LayoutError(
                f"{adapter.name}: {storage.uri_for(entry.path)} has label {entry.label} and class "
                f"{entry.class_name!r}, which disagree with the class list; the adapter or its index files are damaged"
            )
        entries.append(ImageEntry(entry.path, entry.label, keys[entry.label]))
    subset = adapter.imagenet_subset
    expected = tuple(keys[label] for label in subset) if subset is not None else keys
    listed = tuple(sorted({entry.class_name for entry in entries}))
    problems = class_findings(listed, expected) + unsafe_path_findings(entries)
    return DatasetIndex(adapter.name, split, storage.uri, classes, keys, tuple(entries), expected, listed,
                        tuple(problems))
