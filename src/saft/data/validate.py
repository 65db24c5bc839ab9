"""Checks that a dataset root (or a manifest over it) is fit to train and evaluate on.

Bad data rarely fails loudly: a truncated JPEG crashes a DataLoader worker hours into
a run, a symlink quietly pulls files from outside the versioned dataset, a duplicate
image filed under two classes caps accuracy. :func:`validate_root` finds these up
front and reports each kind of problem with a count and example paths;
:class:`DataValidationError` lets a step refuse the data, and :func:`skip_corrupt`
lets it drop broken files instead, logging how many, without ever losing a class.

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

import io
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Sequence, TypeVar

from PIL import Image, UnidentifiedImageError

from saft.data.imagefolder import scan_image_folder
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
    """Why Pillow cannot fully decode ``data``, or None if it decodes.

    ``load()`` decodes every pixel, which is what catches truncated files; a header
    check alone (``verify()``) does not. Relies on Pillow's default
    ``ImageFile.LOAD_TRUNCATED_IMAGES = False``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except UnidentifiedImageError:
        return "not a recognised image format (Pillow cannot identify it)"
    except Exception as err:  # Pillow plugins raise OSError, SyntaxError, ValueError, struct.error...
        return f"{type(err).__name__}: {err}"
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
    findings: list[Finding] = []
    if entries is None:
        index = scan_image_folder(storage)
        items: list[LabelledPath] = list(index.entries)
        found = tuple(index.classes)
        findings += [Finding("empty_class", name) for name, n in index.counts().items() if n == 0]
    else:
        items = list(entries)
        found = tuple(sorted({item.class_name for item in items}))
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
