"""Class lists, subsets and prompt templates read from installed packages.

The ImageNet facts (the 1000 wnids, the 200-class subsets of ImageNet-A and -R, the
human-readable class names and CLIP's 80 prompts) already ship with ``timm`` and
``open_clip``, which the project depends on. Reading them at run time keeps one source of
truth; the spec records where each list lives and how long it must be, and every load
checks that count, so an upgrade that edits or truncates a list stops with an error
naming the file and the installed version instead of silently shifting labels.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

from saft.data.adapters.errors import SpecError
from saft.data.adapters.spec import ClassesSpec, ModuleAttributeRef, PackageFileRef, TemplateSource, check_template


def clean_class_name(name: str, underscores_to_spaces: bool) -> str:
    """The class name as it goes into a prompt: ``american_bulldog`` -> ``american bulldog``.

    CLIP was trained on natural captions, so identifiers written with underscores match
    its text encoder worse than plain words. Runs of whitespace collapse to one space.
    """
    if underscores_to_spaces:
        name = name.replace("_", " ")
    return " ".join(name.split())


def _installed(module: str) -> str:
    """``"timm 1.0.31"``-style text naming the distribution that provides ``module``."""
    top = module.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top, [top])
    parts = []
    for dist in dists:
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} (version unknown)")
    return ", ".join(parts)


def _check_count(items: Sequence[object], expected: int, what: str, module: str) -> None:
    if len(items) != expected:
        raise SpecError(
            f"{what} holds {len(items)} entries but the dataset spec expects {expected}; the installed "
            f"{_installed(module)} changed this list. Install a version that ships the expected list "
            "or update the spec after checking that labels still mean the same classes."
        )


@functools.lru_cache(maxsize=None)
def read_package_lines(ref: PackageFileRef) -> tuple[str, ...]:
    """The non-blank lines (stripped) of a data file inside an installed package."""
    try:
        text = resources.files(ref.package).joinpath(ref.file).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise SpecError(
            f"{ref.describe()} cannot be read: package {ref.package!r} is not installed; "
            "install the project's dependencies (pip install -e .)"
        ) from None
    except (FileNotFoundError, NotADirectoryError):
        raise SpecError(
            f"{ref.describe()} does not exist in the installed {_installed(ref.package)}; "
            "the package moved or dropped this file, so pin a version that has it"
        ) from None
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    _check_count(lines, ref.count, ref.describe(), ref.package)
    return lines


@functools.lru_cache(maxsize=None)
def read_module_attribute(ref: ModuleAttributeRef) -> tuple[object, ...]:
    """The items of a sequence defined by an installed module."""
    try:
        module = importlib.import_module(ref.module)
    except ModuleNotFoundError as err:
        raise SpecError(f"{ref.describe()} cannot be read: {err}; install the project's dependencies") from None
    try:
        value = getattr(module, ref.attribute)
    except AttributeError:
        raise SpecError(
            f"{ref.describe()} does not exist in the installed {_installed(ref.module)}; "
            "pin a version that defines it"
        ) from None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SpecError(f"{ref.describe()} is a {type(value).__name__}, not a list or tuple")
    items = tuple(value)
    _check_count(items, ref.count, ref.describe(), ref.module)
    return items


@dataclass(frozen=True)
class ClassSpace:
    """A fixed class list: ``keys[i]`` (a wnid) and ``names[i]`` belong to label ``i``."""

    keys: tuple[str, ...]
    names: tuple[str, ...]
    _labels: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_labels", {key: label for label, key in enumerate(self.keys)})

    def label_of(self, key: str) -> int | None:
        """The label of a class key, or None when the key is not in this space."""
        return self._labels.get(key)


@functools.lru_cache(maxsize=None)
def load_class_space(classes: ClassesSpec) -> ClassSpace:
    """The fixed class list of a ``packages`` class source.

    Keys are sorted before labels are assigned: ImageNet's label order is defined as the
    sorted wnid list, so the labels do not depend on the order lines happen to have in the
    data file. Names must already be in that order (open_clip documents it).
    """
    if classes.keys is None or classes.names is None:
        raise SpecError("only classes with source 'packages' define a fixed class list")
    raw_keys = read_package_lines(classes.keys)
    if len(set(raw_keys)) != len(raw_keys):
        repeated = sorted({key for key in raw_keys if raw_keys.count(key) > 1})
        raise SpecError(f"{classes.keys.describe()} repeats class keys: {', '.join(repeated[:5])}")
    names = read_module_attribute(classes.names)
    bad = [i for i, name in enumerate(names) if not isinstance(name, str) or not name.strip()]
    if bad:
        raise SpecError(f"{classes.names.describe()} item {bad[0]} is not a non-empty string")
    if len(names) != len(raw_keys):
        raise SpecError(
            f"{classes.names.describe()} has {len(names)} names but {classes.keys.describe()} has "
            f"{len(raw_keys)} keys; they must describe the same classes"
        )
    return ClassSpace(
        keys=tuple(sorted(raw_keys)),
        names=tuple(clean_class_name(str(name), classes.underscores_to_spaces) for name in names),
    )


@functools.lru_cache(maxsize=None)
def load_subset(ref: PackageFileRef, classes: ClassesSpec) -> tuple[int, ...]:
    """Sorted labels (in the full class space) of the keys listed by ``ref``."""
    space = load_class_space(classes)
    space_source = classes.keys.describe() if classes.keys is not None else "the class list"
    keys = read_package_lines(ref)
    labels: list[int] = []
    for key in keys:
        label = space.label_of(key)
        if label is None:
            raise SpecError(f"{ref.describe()} lists {key!r}, which is not a class of {space_source}")
        labels.append(label)
    if len(set(labels)) != len(labels):
        raise SpecError(f"{ref.describe()} lists a class more than once")
    return tuple(sorted(labels))


@functools.lru_cache(maxsize=None)
def resolve_templates(source: TemplateSource, where: str) -> tuple[str, ...]:
    """Prompt templates as ``str.format`` strings with one ``{}``.

    open_clip keeps its prompts as functions of the class name; calling one with ``"{}"``
    recovers the format string, which is then checked like a template written in a spec.
    """
    if isinstance(source, tuple):
        return source
    items = read_module_attribute(source)
    templates: list[str] = []
    for number, item in enumerate(items, start=1):
        at = f"{where} ({source.describe()} item {number})"
        text = item("{}") if callable(item) else item
        templates.append(check_template(text, at))
    if len(set(templates)) != len(templates):
        raise SpecError(f"{where}: {source.describe()} repeats a template")
    return tuple(templates)
