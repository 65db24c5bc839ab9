"""Dataset specs: the YAML files in ``saft/data/specs`` that describe each dataset.

A spec says where a dataset's images are, where its class names and prompt templates
come from and whether it may be trained on; the adapter code only knows the four layout
kinds. Keeping these facts in data files means a new dataset with a known layout needs a
YAML file and no code, and a reviewer can check the folder names and prompts against the
dataset's documentation without reading Python.

Schema (every key is checked; an unknown key is an error, so a typo cannot be ignored):

``name``
    the adapter name, equal to the file name without ``.yaml``.
``title`` / ``description`` / ``notes``
    human text; ``notes`` records protocol facts users must know (e.g. logit restriction).
``layout``
    ``class-folders`` (one folder per class, named by the class), ``index-folders`` (one
    folder per class, named by its label), ``split-json`` (a JSON file listing
    ``[path, label, class name]`` per split) or ``aircraft-txt`` (FGVC-Aircraft's text lists).
``eval_only``
    true for sets that exist only to measure robustness; they refuse training.
``splits`` / ``default_split``
    split name -> where the layout finds it: candidate folders (``""`` is the root itself)
    for the folder layouts, the JSON key for ``split-json``, the list file for ``aircraft-txt``.
``classes``
    ``{source: folder-names}``, ``{source: split-file}``, ``{source: lines-file, file: ...}``
    or ``{source: packages, keys: <file ref>, names: <attribute ref>}``; optional
    ``underscores_to_spaces: true`` turns ``american_bulldog`` into ``american bulldog``.
``class_space``
    instead of ``classes``: the name of another spec whose fixed class list (and, unless
    given, templates) this set uses, e.g. ``imagenet`` for ImageNet-V2.
``templates``
    template-set name -> list of prompts with one ``{}``, or an attribute reference; a
    ``default`` set is required.
``subset``
    a file reference listing the class keys (wnids) a set covers, for 200-class sets.
``split_file`` / ``image_dir`` / ``image_suffix`` / ``base_dirs``
    layout details (see the layout modules).
``layout_hint``
    the expected tree, shown in every error about a root that does not match it.

References name data in installed packages instead of copying it into this repository:
``{package: timm.data, file: _info/imagenet_synsets.txt, count: 1000}`` (a data file, read
with :mod:`importlib.resources`) and ``{module: open_clip.zero_shot_metadata, attribute:
IMAGENET_CLASSNAMES, count: 1000}`` (a module attribute). ``count`` is checked when the
data is loaded, so a dependency that changes its lists fails loudly instead of shifting
labels. Only modules of :data:`TRUSTED_PACKAGES` may be named, so a spec cannot import
arbitrary code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from saft.config import did_you_mean
from saft.data.adapters.errors import SpecError, UnknownDatasetError
from saft.data.paths import UnsafePathError, check_relpath
from saft.data.templates import check_template as _check_template
from saft.io import read_text

LAYOUTS: tuple[str, ...] = ("class-folders", "index-folders", "split-json", "aircraft-txt")
CLASS_SOURCES: dict[str, tuple[str, ...]] = {
    "class-folders": ("folder-names", "packages"),
    "index-folders": ("packages",),
    "split-json": ("split-file",),
    "aircraft-txt": ("lines-file",),
}
"""Which class-name sources each layout can use."""

TRUSTED_PACKAGES: frozenset[str] = frozenset({"open_clip", "timm"})
"""Top-level packages whose data files and attributes specs may reference."""

DEFAULT_TEMPLATE_SET = "default"
SPEC_PACKAGE = "saft.data"
SPEC_FOLDER = "specs"

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_COMMON_KEYS = frozenset(
    {
        "name", "title", "description", "notes", "layout", "eval_only", "splits", "default_split",
        "classes", "class_space", "templates", "subset", "layout_hint",
    }
)
_LAYOUT_KEYS: dict[str, frozenset[str]] = {
    "class-folders": frozenset(),
    "index-folders": frozenset(),
    "split-json": frozenset({"split_file", "image_dir"}),
    "aircraft-txt": frozenset({"image_dir", "image_suffix", "base_dirs"}),
}


@dataclass(frozen=True)
class PackageFileRef:
    """A text file shipped inside an installed package, one item per line."""

    package: str
    file: str
    count: int

    def describe(self) -> str:
        return f"{self.package}:{self.file}"


@dataclass(frozen=True)
class ModuleAttributeRef:
    """A sequence defined by an installed module (class names, prompt templates)."""

    module: str
    attribute: str
    count: int

    def describe(self) -> str:
        return f"{self.module}.{self.attribute}"


TemplateSource = tuple[str, ...] | ModuleAttributeRef


@dataclass(frozen=True)
class ClassesSpec:
    """Where the class names (in label order) come from."""

    source: str
    keys: PackageFileRef | None = None
    names: ModuleAttributeRef | None = None
    file: str | None = None
    underscores_to_spaces: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """One parsed, checked spec file (``class_space`` already resolved into ``classes``)."""

    name: str
    title: str
    layout: str
    eval_only: bool
    splits: Mapping[str, tuple[str, ...]]
    default_split: str
    classes: ClassesSpec
    templates: Mapping[str, TemplateSource]
    layout_hint: str
    source: str
    description: str = ""
    notes: str = ""
    class_space: str | None = None
    subset: PackageFileRef | None = None
    split_file: str | None = None
    image_dir: str = ""
    image_suffix: str = ".jpg"
    base_dirs: tuple[str, ...] = ("",)


# --- template checks ------------------------------------------------------------------------


def check_template(template: object, where: str) -> str:
    """:func:`saft.data.templates.check_template`, reporting a bad template as a :class:`SpecError`."""
    return _check_template(template, where, SpecError)


# --- parsing --------------------------------------------------------------------------------


class _Reader:
    """Typed access to one mapping of a spec file, with messages naming file and key."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise SpecError(f"{where} must be a mapping, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.where = where

    def at(self, key: str) -> str:
        return f"{self.where}: field '{key}'"

    def has(self, key: str) -> bool:
        return key in self.data

    def required(self, key: str) -> Any:
        if key not in self.data:
            raise SpecError(f"{self.where}: required field '{key}' is missing")
        return self.data[key]

    def text(self, key: str, default: str | None = None, *, allow_empty: bool = False) -> str:
        value = self.required(key) if default is None else self.data.get(key, default)
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise SpecError(f"{self.at(key)} must be a non-empty string, got {value!r}")
        return value

    def flag(self, key: str, default: bool | None = None) -> bool:
        value = self.required(key) if default is None else self.data.get(key, default)
        if not isinstance(value, bool):
            raise SpecError(f"{self.at(key)} must be true or false, got {value!r}")
        return value

    def count(self, key: str) -> int:
        value = self.required(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"{self.at(key)} must be a positive integer, got {value!r}")
        return value

    def only(self, allowed: frozenset[str] | set[str]) -> None:
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            raise SpecError(
                f"{self.where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                f"allowed here: {', '.join(sorted(allowed))}"
            )


def _relpath(value: object, where: str, *, allow_root: bool) -> str:
    """A folder or file inside the dataset root; ``""`` means the root itself when allowed."""
    if value == "" and allow_root:
        return ""
    if not isinstance(value, str):
        raise SpecError(f"{where} must be a relative path string, got {value!r}")
    try:
        return check_relpath(value)
    except UnsafePathError as err:
        raise SpecError(f"{where}: {err}") from None


def _trusted_module(module: str, where: str) -> str:
    if not isinstance(module, str) or not _DOTTED.match(module):
        raise SpecError(f"{where} must be a dotted module name, got {module!r}")
    if module.split(".")[0] not in TRUSTED_PACKAGES:
        raise SpecError(
            f"{where}: {module!r} is not in a trusted package; specs may reference only "
            f"{', '.join(sorted(TRUSTED_PACKAGES))}"
        )
    return module


def _package_file_ref(data: object, where: str) -> PackageFileRef:
    reader = _Reader(data, where)
    reader.only({"package", "file", "count"})
    package = _trusted_module(reader.required("package"), reader.at("package"))
    return PackageFileRef(
        package=package,
        file=_relpath(reader.required("file"), reader.at("file"), allow_root=False),
        count=reader.count("count"),
    )


def _attribute_ref(data: object, where: str) -> ModuleAttributeRef:
    reader = _Reader(data, where)
    reader.only({"module", "attribute", "count"})
    module = _trusted_module(reader.required("module"), reader.at("module"))
    attribute = reader.text("attribute")
    if not attribute.isidentifier():
        raise SpecError(f"{reader.at('attribute')} must be a Python identifier, got {attribute!r}")
    return ModuleAttributeRef(module=module, attribute=attribute, count=reader.count("count"))


def _classes(data: object, layout: str, where: str) -> ClassesSpec:
    reader = _Reader(data, where)
    source = reader.text("source")
    allowed_sources = CLASS_SOURCES[layout]
    if source not in allowed_sources:
        raise SpecError(
            f"{reader.at('source')} is {source!r}, which layout {layout!r} cannot use; "
            f"use one of: {', '.join(allowed_sources)}"
        )
    cleaning = reader.flag("underscores_to_spaces", False)
    if source == "packages":
        reader.only({"source", "keys", "names", "underscores_to_spaces"})
        return ClassesSpec(
            source=source,
            keys=_package_file_ref(reader.required("keys"), reader.at("keys")),
            names=_attribute_ref(reader.required("names"), reader.at("names")),
            underscores_to_spaces=cleaning,
        )
    if source == "lines-file":
        reader.only({"source", "file", "underscores_to_spaces"})
        file = _relpath(reader.required("file"), reader.at("file"), allow_root=False)
        return ClassesSpec(source=source, file=file, underscores_to_spaces=cleaning)
    reader.only({"source", "underscores_to_spaces"})
    return ClassesSpec(source=source, underscores_to_spaces=cleaning)


def _templates(data: object, where: str) -> dict[str, TemplateSource]:
    reader = _Reader(data, where)
    if DEFAULT_TEMPLATE_SET not in reader.data:
        raise SpecError(f"{where} needs a '{DEFAULT_TEMPLATE_SET}' template set")
    sets: dict[str, TemplateSource] = {}
    for set_name, value in reader.data.items():
        at = reader.at(str(set_name))
        if not isinstance(set_name, str) or not _NAME.match(set_name):
            raise SpecError(f"{where}: template set name {set_name!r} must be lowercase letters, digits, '-' or '_'")
        if isinstance(value, list):
            if not value:
                raise SpecError(f"{at} lists no templates")
            checked = tuple(check_template(item, f"{at}, item {i}") for i, item in enumerate(value, start=1))
            if len(set(checked)) != len(checked):
                raise SpecError(f"{at} repeats a template; each one must appear once")
            sets[set_name] = checked
        elif isinstance(value, dict):
            sets[set_name] = _attribute_ref(value, at)
        else:
            raise SpecError(
                f"{at} must be a list of templates (e.g. [\"a photo of a {{}}.\"]) or a reference "
                f"{{module: ..., attribute: ..., count: ...}}, got {value!r}"
            )
    return sets


def _splits(data: object, layout: str, where: str) -> dict[str, tuple[str, ...]]:
    reader = _Reader(data, where)
    if not reader.data:
        raise SpecError(f"{where} defines no split")
    splits: dict[str, tuple[str, ...]] = {}
    folder_layout = layout in ("class-folders", "index-folders")
    for split, value in reader.data.items():
        at = reader.at(str(split))
        if not isinstance(split, str) or not _NAME.match(split):
            raise SpecError(f"{where}: split name {split!r} must be lowercase letters, digits, '-' or '_'")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise SpecError(f"{at} names no location")
        if not folder_layout and len(values) != 1:
            raise SpecError(f"{at} must be a single name for layout {layout!r}, got {value!r}")
        if layout == "split-json":
            if not isinstance(values[0], str) or not values[0]:
                raise SpecError(f"{at} must name a key of the split file, got {value!r}")
            splits[split] = (values[0],)
        else:
            splits[split] = tuple(_relpath(item, at, allow_root=folder_layout) for item in values)
    return splits


def parse_spec(
    data: object,
    source: str,
    *,
    expected_name: str | None = None,
    class_space_lookup: Callable[[str], "DatasetSpec"] | None = None,
) -> DatasetSpec:
    """Check a spec mapping (as loaded from YAML) and build its :class:`DatasetSpec`.

    ``class_space_lookup`` resolves a ``class_space`` name to the spec that owns the class
    list; without it a spec naming a class space is refused.
    """
    top = _Reader(data, f"dataset spec {source}")
    name = top.text("name")
    if not _NAME.match(name):
        raise SpecError(f"{top.at('name')} must be lowercase letters, digits, '-' or '_', got {name!r}")
    if expected_name is not None and name != expected_name:
        raise SpecError(f"{top.at('name')} is {name!r} but the file is named for {expected_name!r}; make them equal")
    layout = top.text("layout")
    if layout not in LAYOUTS:
        raise SpecError(f"{top.at('layout')} is {layout!r}; use one of: {', '.join(LAYOUTS)}")
    top.only(_COMMON_KEYS | _LAYOUT_KEYS[layout])

    splits = _splits(top.required("splits"), layout, top.at("splits"))
    default_split = top.text("default_split")
    if default_split not in splits:
        raise SpecError(
            f"{top.at('default_split')} is {default_split!r}, which is not among the splits {sorted(splits)}"
        )

    class_space: str | None = None
    inherited_templates: Mapping[str, TemplateSource] | None = None
    if top.has("class_space"):
        if top.has("classes"):
            raise SpecError(f"dataset spec {source}: give either 'classes' or 'class_space', not both")
        class_space = top.text("class_space")
        if class_space_lookup is None:
            raise SpecError(f"{top.at('class_space')}: no spec registry is available to resolve {class_space!r}")
        owner = class_space_lookup(class_space)
        if owner.class_space is not None or owner.classes.source != "packages":
            raise SpecError(
                f"{top.at('class_space')}: {class_space!r} does not define a fixed class list of its own; "
                "name a spec whose classes come from packages"
            )
        classes = owner.classes
        inherited_templates = owner.templates
    else:
        classes = _classes(top.required("classes"), layout, top.at("classes"))
    if layout == "index-folders" and classes.source != "packages":
        raise SpecError(
            f"dataset spec {source}: layout 'index-folders' needs a fixed class list (classes from packages)"
        )

    if top.has("templates"):
        templates = _templates(top.required("templates"), top.at("templates"))
    elif inherited_templates is not None:
        templates = dict(inherited_templates)
    else:
        raise SpecError(f"dataset spec {source}: required field 'templates' is missing")

    subset = None
    if top.has("subset"):
        if classes.keys is None:
            raise SpecError(f"{top.at('subset')}: a subset needs class keys (classes from packages with 'keys')")
        subset = _package_file_ref(top.required("subset"), top.at("subset"))

    details: dict[str, Any] = {}
    if layout == "split-json":
        details["split_file"] = _relpath(top.required("split_file"), top.at("split_file"), allow_root=False)
        details["image_dir"] = _relpath(top.data.get("image_dir", ""), top.at("image_dir"), allow_root=True)
    if layout == "aircraft-txt":
        details["image_dir"] = _relpath(top.required("image_dir"), top.at("image_dir"), allow_root=True)
        suffix = top.text("image_suffix", ".jpg")
        if not suffix.startswith(".") or "/" in suffix:
            raise SpecError(f"{top.at('image_suffix')} must be a file extension like '.jpg', got {suffix!r}")
        details["image_suffix"] = suffix
        bases = top.data.get("base_dirs", [""])
        if not isinstance(bases, list) or not bases:
            raise SpecError(f"{top.at('base_dirs')} must be a non-empty list of folders, got {bases!r}")
        details["base_dirs"] = tuple(_relpath(item, top.at("base_dirs"), allow_root=True) for item in bases)

    return DatasetSpec(
        name=name,
        title=top.text("title"),
        layout=layout,
        eval_only=top.flag("eval_only"),
        splits=splits,
        default_split=default_split,
        classes=classes,
        templates=templates,
        layout_hint=top.text("layout_hint").strip(),
        source=source,
        description=top.text("description", "", allow_empty=True).strip(),
        notes=top.text("notes", "", allow_empty=True).strip(),
        class_space=class_space,
        subset=subset,
        **details,
    )


def _load_yaml(text: str, source: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"dataset spec {source} is not valid YAML: {err}") from None


# --- packaged specs -------------------------------------------------------------------------


def _spec_dir() -> Any:
    return resources.files(SPEC_PACKAGE).joinpath(SPEC_FOLDER)


def packaged_spec_names() -> tuple[str, ...]:
    """Names of the specs shipped with the package, sorted."""
    return tuple(sorted(item.name[: -len(".yaml")] for item in _spec_dir().iterdir() if item.name.endswith(".yaml")))


_PACKAGED: dict[str, DatasetSpec] = {}
_LOADING: set[str] = set()


def load_packaged_spec(name: str) -> DatasetSpec:
    """The shipped spec called ``name`` (parsed once per process)."""
    if name in _PACKAGED:
        return _PACKAGED[name]
    known = packaged_spec_names()
    if name not in known:
        raise UnknownDatasetError(f"unknown dataset {name!r}{did_you_mean(name, known)}; known datasets: "
                                  f"{', '.join(known)} (`saft data adapters` shows their layouts)")
    source = f"saft/data/specs/{name}.yaml"
    if name in _LOADING:  # a class_space chain that leads back to itself
        raise SpecError(
            f"dataset spec {source} is part of a class_space cycle; a class space must define its own classes"
        )
    _LOADING.add(name)
    try:
        item = _spec_dir().joinpath(f"{name}.yaml")
        spec = parse_spec(
            _load_yaml(item.read_text(encoding="utf-8"), source),
            source,
            expected_name=name,
            class_space_lookup=load_packaged_spec,
        )
    finally:
        _LOADING.discard(name)
    _PACKAGED[name] = spec
    return spec


def load_spec_file(path: str | os.PathLike) -> DatasetSpec:
    """A spec from a YAML file outside the package (its ``class_space`` may name a shipped spec)."""
    path = Path(path).expanduser()
    text = read_text(path, "dataset spec", SpecError)
    return parse_spec(_load_yaml(text, str(path)), str(path), class_space_lookup=load_packaged_spec)
