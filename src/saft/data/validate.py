"""Checks that a dataset root (or a manifest over it) is fit to train and evaluate on.

Bad data rarely fails loudly: a truncated JPEG crashes a DataLoader worker hours into
a run, a symlink quietly pulls files from outside the versioned dataset, a duplicate
image filed under two classes caps accuracy. :func:`validate_root` finds these up
front and reports each kind of problem with a count and example paths;
:class:`DataValidationError` lets a step refuse the data, and :func:`skip_corrupt`
lets it drop broken files instead, logging how many, without ever losing a class.
:func:`validate_dataset` does the same for one split of a named dataset, checking the
images its adapter indexes (ImageNet folders, CoOp split files, ...) against the classes
the dataset must have.

Problem kinds (``Finding.kind``), errors unless marked:

- ``missing_class`` / ``extra_class``: class names differ from the expected list
- ``empty_class``: a class folder without images
- ``unsafe_path``: absolute, ``..`` or non-normal path, or a symlink out of the root
- ``missing_file``: a listed file does not exist
- ``unreadable``: the file exists but cannot be read (permissions, I/O error)
- ``zero_byte``: an empty file
- ``corrupt``: Pillow cannot fully decode it (includes truncated files)
- ``hash_mismatch``: the bytes differ from the manifest's sha256
- ``conflicting_duplicate``: identical bytes filed under different classes
- ``duplicate`` (warning): identical bytes more than once within one class
"""

from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Sequence, TypeVar

from PIL import UnidentifiedImageError

from saft.data.adapters import AdapterError, DatasetAdapter, LayoutError, get_adapter
from saft.data.adapters.sources import load_class_space
from saft.data.images import ImageDecodeError, load_rgb
from saft.data.imagefolder import ImageEntry, ImageFolderIndex, scan_image_folder
from saft.data.manifest import LabelledPath
from saft.data.paths import UnsafePathError, check_relpath
from saft.data.storage import (
    ChecksumMismatchError,
    LocalStorage,
    ObjectNotFoundError,
    Storage,
    open_storage,
    sha256_bytes,
)

log = logging.getLogger(__name__)

FILE_ERRORS: tuple[str, ...] = (
    "unsafe_path",
    "missing_file",
    "unreadable",
    "zero_byte",
    "corrupt",
    "hash_mismatch",
)
"""Problems confined to one file: :func:`skip_corrupt` may drop such files."""

CLASS_ERRORS: tuple[str, ...] = ("missing_class", "extra_class", "empty_class", "conflicting_duplicate")
"""Problems that change what the classes are: never skippable."""

WARNINGS: tuple[str, ...] = ("duplicate",)

_DESCRIPTIONS = {
    "missing_class": "expected class(es) not found",
    "extra_class": "class(es) not in the expected class list",
    "empty_class": "class(es) without any image",
    "unsafe_path": "path(s) that leave the dataset root",
    "missing_file": "listed file(s) that do not exist",
    "unreadable": "file(s) that cannot be read",
    "zero_byte": "empty (zero-byte) file(s)",
    "corrupt": "file(s) Pillow cannot decode (corrupt or truncated)",
    "hash_mismatch": "file(s) whose bytes differ from the manifest's sha256",
    "conflicting_duplicate": "file(s) whose identical bytes also appear under another class",
    "duplicate": "file(s) whose identical bytes appear again in the same class",
}

_ORDER = CLASS_ERRORS + FILE_ERRORS + WARNINGS

E = TypeVar("E", bound=LabelledPath)


@dataclass(frozen=True)
class Finding:
    """One problem: its kind, the file or class it concerns, and what exactly is wrong."""

    kind: str
    subject: str
    detail: str = ""


@dataclass
class ValidationReport:
    """Everything :func:`validate_root` found, grouped by kind."""

    root: str
    files_checked: int
    classes: tuple[str, ...]
    findings: list[Finding] = field(default_factory=list)

    def by_kind(self) -> dict[str, list[Finding]]:
        grouped: dict[str, list[Finding]] = {}
        for finding in sorted(self.findings, key=lambda f: (_ORDER.index(f.kind), f.subject)):
            grouped.setdefault(finding.kind, []).append(finding)
        return grouped

    def count(self, kind: str) -> int:
        return sum(1 for finding in self.findings if finding.kind == kind)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.kind not in WARNINGS]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.kind in WARNINGS]

    @property
    def ok(self) -> bool:
        """True when nothing but warnings was found."""
        return not self.errors

    def bad_paths(self) -> set[str]:
        """Paths with a file-level error (what :func:`skip_corrupt` drops)."""
        return {f.subject for f in self.findings if f.kind in FILE_ERRORS}

    def format(self, max_examples: int = 5) -> str:
        """A readable summary: verdict, then per kind a count and up to ``max_examples`` examples."""
        verdict = "OK" if self.ok else "FAILED"
        lines = [
            f"Dataset check of {self.root}: {self.files_checked} file(s), {len(self.classes)} class(es): "
            f"{verdict} ({len(self.errors)} error(s), {len(self.warnings)} warning(s))"
        ]
        for kind, findings in self.by_kind().items():
            level = "warning" if kind in WARNINGS else "error"
            lines.append(f"  {level} {kind}: {len(findings)} {_DESCRIPTIONS[kind]}")
            for finding in findings[:max_examples]:
                suffix = f": {finding.detail}" if finding.detail else ""
                lines.append(f"      {finding.subject}{suffix}")
            if len(findings) > max_examples:
                lines.append(f"      ... and {len(findings) - max_examples} more")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raise :class:`DataValidationError` unless :attr:`ok`."""
        if not self.ok:
            raise DataValidationError(self)


class DataValidationError(ValueError):
    """Data that must not be used; ``.report`` holds the full findings."""

    def __init__(self, report: ValidationReport, message: str | None = None) -> None:
        self.report = report
        text = report.format()
        super().__init__(f"{message}\n{text}" if message else text)


def _check_file(storage: Storage, relpath: str, expected_sha256: str | None) -> tuple[list[Finding], str | None]:
    """Findings for one file, and the sha256 of its bytes when they could be read."""
    try:
        check_relpath(relpath)
        if isinstance(storage, LocalStorage):
            data = storage.read_bytes(relpath)
        else:  # goes through the cache, so training later reads the same verified blob
            with open(storage.fetch(relpath, expected_sha256), "rb") as fh:
                data = fh.read()
    except UnsafePathError as err:
        return [Finding("unsafe_path", relpath, str(err))], None
    except ChecksumMismatchError as err:
        return [Finding("hash_mismatch", relpath, str(err))], None
    except (ObjectNotFoundError, FileNotFoundError):
        return [Finding("missing_file", relpath)], None
    except OSError as err:
        return [Finding("unreadable", relpath, f"{type(err).__name__}: {err}")], None
    digest = sha256_bytes(data)
    findings: list[Finding] = []
    if expected_sha256 is not None and digest != expected_sha256:
        findings.append(Finding("hash_mismatch", relpath, f"sha256 is {digest}, manifest says {expected_sha256}"))
    if not data:
        return findings + [Finding("zero_byte", relpath)], None
    problem = image_problem(data)
    if problem is not None:
        findings.append(Finding("corrupt", relpath, problem))
    return findings, digest


def image_problem(data: bytes) -> str | None:
    """Why ``data`` cannot be decoded the way training reads it, or None if it decodes.

    Uses :func:`saft.data.images.load_rgb`, the decoder of training and evaluation, so a
    file that passes here is one they can read. It decodes every pixel, which is what
    catches truncated files; a header check alone (``verify()``) does not. Relies on
    Pillow's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_rgb(data, "image")
    except ImageDecodeError as err:
        cause = err.__cause__
        if isinstance(cause, UnidentifiedImageError):
            return "not a recognised image format (Pillow cannot identify it)"
        if cause is not None:
            return f"{type(cause).__name__}: {cause}"
        return str(err)
    return None


def validate_root(
    root: str | os.PathLike | Storage,
    entries: Iterable[LabelledPath] | None = None,
    *,
    expected_classes: Sequence[str] | None = None,
    workers: int = 8,
) -> ValidationReport:
    """Check a dataset root, or the given entries (e.g. a manifest) under it.

    Without ``entries`` the root is scanned as an ImageFolder. Entries that carry a
    ``sha256`` (manifest entries) are also checked against it. With ``expected_classes``
    the classes found are compared with that list; in entry mode a class with no entry
    counts as missing.
    """
    storage = open_storage(root)
    if entries is None:
        return _check_index(storage, scan_image_folder(storage), expected_classes, workers)
    items = list(entries)
    found = tuple(sorted({item.class_name for item in items}))
    return _check_items(storage, items, found, [], expected_classes, workers)


def _check_index(
    storage: Storage, index: ImageFolderIndex, expected_classes: Sequence[str] | None, workers: int
) -> ValidationReport:
    """Scan-mode check of an ImageFolder index: its images, plus class folders holding none."""
    empty = [Finding("empty_class", name) for name, n in index.counts().items() if n == 0]
    return _check_items(storage, list(index.entries), tuple(index.classes), empty, expected_classes, workers)


def _check_items(
    storage: Storage,
    items: list[LabelledPath],
    found: tuple[str, ...],
    findings: list[Finding],
    expected_classes: Sequence[str] | None,
    workers: int,
) -> ValidationReport:
    findings = list(findings)
    if expected_classes is not None:
        expected = set(expected_classes)
        findings += [Finding("missing_class", name) for name in sorted(expected - set(found))]
        findings += [Finding("extra_class", name) for name in sorted(set(found) - expected)]

    def check(item: LabelledPath) -> tuple[list[Finding], str | None]:
        return _check_file(storage, item.path, getattr(item, "sha256", None))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(check, items))

    first_seen: dict[str, LabelledPath] = {}
    for item, (file_findings, digest) in zip(items, results):
        findings += file_findings
        if digest is None:
            continue
        earlier = first_seen.setdefault(digest, item)
        if earlier is item:
            continue
        if earlier.class_name == item.class_name:
            findings.append(Finding("duplicate", item.path, f"same bytes as {earlier.path}"))
        else:
            findings.append(
                Finding(
                    "conflicting_duplicate",
                    item.path,
                    f"class {item.class_name!r}, same bytes as {earlier.path} (class {earlier.class_name!r})",
                )
            )
    return ValidationReport(root=storage.uri, files_checked=len(items), classes=found, findings=findings)


# --- one split of a named dataset ----------------------------------------------------------


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
    clashes = sorted({key for key in keys if keys.count(key) > 1})
    if clashes:
        raise AdapterError(
            f"the class list has names that cannot be told apart even with their ids: {', '.join(clashes[:5])}; "
            "rename those classes"
        )
    return keys


def reads_root_as_image_folder(adapter: DatasetAdapter, split: str) -> bool:
    """True when ``split`` of this dataset is the root itself laid out as ``<root>/<class>/<image>``.

    Such a root is checked as a whole (:func:`validate_root` without entries): its class
    folders define the classes, so a class folder without images can only be seen by
    listing the folders, which an index of images cannot show.
    """
    spec = adapter.spec
    return spec.layout == "class-folders" and spec.classes.source == "folder-names" and spec.splits[split] == ("",)


@dataclass(frozen=True)
class DatasetCheck:
    """One split of a dataset as its adapter indexes it, and what validation found there.

    ``entries`` carry the class *key* (see :func:`class_keys`) as ``class_name`` and the
    label in the dataset's label space (ImageNet-A images keep their 1000-class labels);
    ``classes`` holds the real names in label order, ``keys`` the key of each label and
    ``expected`` the keys of the classes the split must cover.
    """

    dataset: str
    split: str
    classes: tuple[str, ...]
    keys: tuple[str, ...]
    entries: tuple[ImageEntry, ...]
    expected: tuple[str, ...]
    report: ValidationReport

    @property
    def name_of_key(self) -> dict[str, str]:
        """Class key -> the class name prompts use."""
        return dict(zip(self.keys, self.classes))


def _resolve_adapter(dataset: str | DatasetAdapter) -> DatasetAdapter:
    return get_adapter(dataset) if isinstance(dataset, str) else dataset


def validate_dataset(
    root: str | os.PathLike | Storage,
    dataset: str | DatasetAdapter = "imagefolder",
    split: str | None = None,
    *,
    workers: int = 8,
) -> DatasetCheck:
    """Index ``split`` (default: the dataset's default split) with the adapter and check it.

    Every indexed image is read and decoded as :func:`validate_root` does. The classes
    the split must cover are the dataset's (for ImageNet-A/-R, the 200 it covers); a class
    without any image in the split is a ``missing_class`` error, since a few-shot draw or
    an evaluation over the full class list would silently lose it. A plain ImageFolder
    root is checked as a whole, exactly as :func:`validate_root` checks it. Raises
    :class:`~saft.data.adapters.AdapterError` (unknown dataset or split, or a root that
    does not match the layout) before any image is read.
    """
    adapter = _resolve_adapter(dataset)
    split = adapter.default_split if split is None else split
    if split not in adapter.splits:
        raise AdapterError(f"dataset {adapter.name!r} has no split {split!r}; its splits: {', '.join(adapter.splits)}")
    storage = open_storage(root)
    if reads_root_as_image_folder(adapter, split):
        index = scan_image_folder(storage)
        report = _check_index(storage, index, None, workers)
        return DatasetCheck(adapter.name, split, index.classes, index.classes, index.entries, index.classes, report)

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
    report = _check_items(storage, list(entries), tuple(sorted({e.class_name for e in entries})), [], expected, workers)
    return DatasetCheck(adapter.name, split, classes, keys, tuple(entries), expected, report)


def skip_corrupt(entries: Sequence[E], report: ValidationReport, *, logger: logging.Logger = log) -> list[E]:
    """Drop entries with file-level errors, logging the count; refuse anything else.

    Class-level problems (missing, extra or empty classes, one image under two classes)
    and a class losing all its images still raise :class:`DataValidationError`, since
    dropping files cannot fix them and training would silently change its label set.
    """
    structural = [f for f in report.findings if f.kind in CLASS_ERRORS]
    if structural:
        raise DataValidationError(report, "skip_corrupt drops broken files only; fix these class problems first")
    bad = report.bad_paths()
    kept = [entry for entry in entries if entry.path not in bad]
    dropped = len(entries) - len(kept)
    if dropped:
        counts = ", ".join(
            f"{kind}: {report.count(kind)}" for kind in FILE_ERRORS if report.count(kind)
        )
        logger.warning("skipped %d of %d entries with broken files under %s (%s)", dropped, len(entries), report.root, counts)
    lost = sorted({entry.class_name for entry in entries} - {entry.class_name for entry in kept})
    if lost:
        raise DataValidationError(
            report, f"skipping broken files would leave class(es) {', '.join(map(repr, lost))} with no image"
        )
    return kept
