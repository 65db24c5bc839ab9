"""The ``split-json`` layout: the fixed few-shot splits of the CoOp benchmark.

Nine of the eleven CoOp datasets (Caltech101, OxfordPets, StanfordCars, Flowers102, Food101,
SUN397, DTD, EuroSAT, UCF101) come with a ``split_zhou_<Name>.json`` file beside their
image folder. It maps ``"train"``, ``"val"`` and ``"test"`` to lists of
``[image path relative to the image folder, label, class name]``. Using this file rather
than the folder names matters: it fixes which images are test images, and its class names
are the cleaned-up ones prompts are built from (CoOp renamed e.g. Caltech101's
``Faces_easy`` to ``face``), so results are comparable with published numbers.

The class list is built from all splits named in the spec, so a label means the same
class whichever split is scanned; labels must run from 0 without gaps and each label
must always carry the same name.
"""

from __future__ import annotations

import json
from typing import Any

from saft.data.adapters.errors import LayoutError
from saft.data.adapters.root_files import check_files_present, examples, join_relpath, read_root_text, safe_relpath
from saft.data.adapters.sources import clean_class_name
from saft.data.adapters.spec import DatasetSpec
from saft.data.imagefolder import ImageEntry, ImageFolderIndex
from saft.data.storage import Storage

Record = tuple[str, int, str]


def read_split_file(storage: Storage, spec: DatasetSpec) -> dict[str, Any]:
    """The parsed split file of the root (a mapping from split key to records)."""
    assert spec.split_file is not None
    text = read_root_text(storage, spec.split_file, dataset=spec.name, hint=spec.layout_hint)
    where = storage.uri_for(spec.split_file)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise LayoutError(f"{spec.name}: {where} is not valid JSON ({err}); download the split file again") from None
    if not isinstance(data, dict):
        raise LayoutError(
            f"{spec.name}: {where} must hold a JSON object with the keys of the splits, got {type(data).__name__}"
        )
    missing = sorted({key for (key,) in spec.splits.values()} - data.keys())
    if missing:
        raise LayoutError(
            f"{spec.name}: {where} has no key(s) {', '.join(map(repr, missing))}; it holds {sorted(data)}"
        )
    return data


def _records(data: dict[str, Any], key: str, where: str) -> list[Record]:
    """The checked ``[path, label, class name]`` records of one split key."""
    items = data[key]
    if not isinstance(items, list):
        raise LayoutError(
            f"{where}: key {key!r} must be a list of [path, label, class name], got {type(items).__name__}"
        )
    records: list[Record] = []
    for number, item in enumerate(items):
        at = f"{where}: {key}[{number}]"
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise LayoutError(f"{at} must be [path, label, class name], got {item!r}")
        path, label, name = item
        if not isinstance(path, str):
            raise LayoutError(f"{at}: the path must be a string, got {path!r}")
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise LayoutError(f"{at}: the label must be an integer >= 0, got {label!r}")
        if not isinstance(name, str) or not name.strip():
            raise LayoutError(f"{at}: the class name must be a non-empty string, got {name!r}")
        records.append((safe_relpath(path, at), label, name))
    return records


def split_file_classes(spec: DatasetSpec, data: dict[str, Any], where: str) -> tuple[str, ...]:
    """Class names in label order, from every split the spec names."""
    names: dict[int, str] = {}
    for (key,) in spec.splits.values():
        for _, label, raw in _records(data, key, where):
            name = clean_class_name(raw, spec.classes.underscores_to_spaces)
            if names.setdefault(label, name) != name:
                raise LayoutError(
                    f"{spec.name}: {where} gives label {label} two class names, {names[label]!r} and {name!r}; "
                    "the split file is damaged, download it again"
                )
    if not names:
        raise LayoutError(f"{spec.name}: {where} lists no images")
    gaps = sorted(set(range(max(names) + 1)) - names.keys())
    if gaps:
        raise LayoutError(
            f"{spec.name}: {where} has no image for label(s) {examples(map(str, gaps))}; labels must run from 0 "
            "without gaps, so the split file is incomplete"
        )
    by_name: dict[str, int] = {}
    for label in sorted(names):
        if names[label] in by_name:
            raise LayoutError(
                f"{spec.name}: {where} gives labels {by_name[names[label]]} and {label} the same class name "
                f"{names[label]!r}; prompts could not tell them apart"
            )
        by_name[names[label]] = label
    return tuple(names[label] for label in sorted(names))


def scan_split_json(storage: Storage, spec: DatasetSpec, split: str, *, check_files: bool) -> ImageFolderIndex:
    """Index one split; paths are relative to the root (the image folder is prefixed)."""
    data = read_split_file(storage, spec)
    where = storage.uri_for(spec.split_file or "")
    classes = split_file_classes(spec, data, where)
    (key,) = spec.splits[split]
    entries: list[ImageEntry] = []
    seen: set[str] = set()
    for path, label, _ in _records(data, key, where):
        relpath = join_relpath(spec.image_dir, path)
        if relpath in seen:
            raise LayoutError(f"{spec.name}: {where} lists {path!r} twice in split {key!r}; the split file is damaged")
        seen.add(relpath)
        entries.append(ImageEntry(path=relpath, label=label, class_name=classes[label]))
    entries.sort(key=lambda entry: entry.path)
    if check_files:
        check_files_present(
            storage, spec.image_dir, (entry.path for entry in entries), dataset=spec.name,
            source=f"{spec.split_file} (split {key!r})",
        )
    return ImageFolderIndex(root=storage.uri, classes=classes, entries=tuple(entries))


def split_json_class_names(storage: Storage, spec: DatasetSpec) -> tuple[str, ...]:
    """The class names of a root, read from its split file alone (no image listing)."""
    return split_file_classes(spec, read_split_file(storage, spec), storage.uri_for(spec.split_file or ""))
