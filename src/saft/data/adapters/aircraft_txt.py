"""The ``aircraft-txt`` layout: FGVC-Aircraft's own text lists, at the variant level.

FGVC-Aircraft has no CoOp split JSON; the benchmark uses the dataset's official split
lists directly. The folder holding them (``fgvc_aircraft/`` in the CoOp arrangement,
``fgvc-aircraft-2013b/data/`` as the archive unpacks) contains:

- ``variants.txt``: the 100 variant names, one a line; the label is the line's position
  (the file's order, not sorted, as in the benchmark);
- ``images_variant_{train,val,test}.txt``: lines ``<image id> <variant name>``, where the
  name may contain spaces (``Boeing 737-200``) and the image is ``images/<image id>.jpg``.

The spec lists the folders to look for these files in (``base_dirs``), so either
arrangement works with the root given as the folder that contains it.
"""

from __future__ import annotations

from saft.data.adapters.errors import LayoutError
from saft.data.adapters.root_files import check_files_present, join_relpath, read_root_text, safe_relpath
from saft.data.adapters.sources import clean_class_name
from saft.data.adapters.spec import DatasetSpec
from saft.data.imagefolder import ImageEntry, ImageFolderIndex
from saft.data.storage import ObjectNotFoundError, Storage


def find_base_dir(storage: Storage, spec: DatasetSpec) -> str:
    """The first of the spec's ``base_dirs`` that holds the class list file."""
    assert spec.classes.file is not None
    for base in spec.base_dirs:
        try:
            storage.read_bytes(join_relpath(base, spec.classes.file))
        except ObjectNotFoundError:
            continue
        return base
    looked = ", ".join(storage.uri_for(join_relpath(base, spec.classes.file)) for base in spec.base_dirs)
    raise LayoutError(f"{spec.name}: no class list found; looked for {looked}. Expected layout: {spec.layout_hint}")


def _lines(text: str) -> list[tuple[int, str]]:
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def read_variant_classes(storage: Storage, spec: DatasetSpec, base: str) -> tuple[str, ...]:
    """Class names in the file's order (label = line position among non-blank lines)."""
    relpath = join_relpath(base, spec.classes.file or "")
    where = storage.uri_for(relpath)
    names: list[str] = []
    for number, raw in _lines(read_root_text(storage, relpath, dataset=spec.name, hint=spec.layout_hint)):
        name = clean_class_name(raw, spec.classes.underscores_to_spaces)
        if name in names:
            raise LayoutError(f"{spec.name}: {where} line {number} repeats the class {name!r}")
        names.append(name)
    if not names:
        raise LayoutError(f"{spec.name}: {where} lists no classes")
    return tuple(names)


def scan_aircraft_txt(storage: Storage, spec: DatasetSpec, split: str, *, check_files: bool) -> ImageFolderIndex:
    """Index one split from its ``<image id> <class name>`` list."""
    base = find_base_dir(storage, spec)
    classes = read_variant_classes(storage, spec, base)
    labels = {name: label for label, name in enumerate(classes)}
    (list_file,) = spec.splits[split]
    relpath = join_relpath(base, list_file)
    where = storage.uri_for(relpath)
    image_dir = join_relpath(base, spec.image_dir)
    entries: list[ImageEntry] = []
    seen: set[str] = set()
    for number, line in _lines(read_root_text(storage, relpath, dataset=spec.name, hint=spec.layout_hint)):
        image_id, _, raw_name = line.partition(" ")
        name = clean_class_name(raw_name, spec.classes.underscores_to_spaces)
        if not name or "/" in image_id or image_id.startswith("."):
            raise LayoutError(f"{spec.name}: {where} line {number} must read '<image id> <class name>', got {line!r}")
        path = safe_relpath(join_relpath(image_dir, image_id + spec.image_suffix), f"{where} line {number}")
        if name not in labels:
            raise LayoutError(
                f"{spec.name}: {where} line {number} names the class {name!r}, which "
                f"{storage.uri_for(join_relpath(base, spec.classes.file or ''))} does not list"
            )
        if path in seen:
            raise LayoutError(f"{spec.name}: {where} line {number} lists image {image_id!r} a second time")
        seen.add(path)
        entries.append(ImageEntry(path=path, label=labels[name], class_name=name))
    entries.sort(key=lambda entry: entry.path)
    if check_files:
        check_files_present(storage, image_dir, (e.path for e in entries), dataset=spec.name, source=relpath)
    return ImageFolderIndex(root=storage.uri, classes=classes, entries=tuple(entries))


def aircraft_class_names(storage: Storage, spec: DatasetSpec) -> tuple[str, ...]:
    """The class names of a root, read from its class list file alone."""
    return read_variant_classes(storage, spec, find_base_dir(storage, spec))
