"""Checks that a dataset root (or a manifest over it) is fit to train and evaluate on.

Bad data rarely fails loudly: a truncated JPEG crashes a DataLoader worker hours into
a run, a symlink quietly pulls files from outside the versioned dataset, a duplicate
image filed under two classes caps accuracy. :func:`validate_root` finds these up
front and reports each kind of problem with a count and example paths;
:class:`DataValidationError` lets a step refuse the data, and :func:`skip_corrupt`
lets it drop broken files instead, logging how many, without ever losing a class.
:func:`validate_dataset` does the same for one split of a named dataset, checking every
image its adapter indexes (ImageNet folders, CoOp split files, ...) against the classes
the dataset must have; this is the full check (``saft data validate``), where
``saft data prepare`` reads only the images it draws (:mod:`saft.data.drawn`).

Every file is read once, with :meth:`saft.data.storage.Storage.load_bytes`: from an S3
root the bytes are streamed, not put in the blob cache, so a one-time scan of a 1.28
million-image split does not fill the local disk (``keep=True`` files them, for a check
right before training reads the same files). Reads run in a bounded thread pool, since
object-store latency rather than the CPU limits a scan, and show a progress bar when
stderr is a terminal.

The problem kinds and the report are defined in :mod:`saft.data.findings`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from PIL import UnidentifiedImageError

from saft.data.adapters import DatasetAdapter
from saft.data.findings import (  # re-exported: validation is where callers look for these
    CLASS_ERRORS,
    FILE_ERRORS,
    WARNINGS,
    DataValidationError,
    Finding,
    ValidationReport,
)
from saft.data.images import ImageDecodeError, load_rgb
from saft.data.imagefolder import scan_image_folder
from saft.data.manifest import LabelledPath
from saft.data.paths import UnsafePathError, check_relpath
from saft.data.split_index import (  # re-exported, as above
    DatasetIndex,
    class_findings,
    class_keys,
    empty_class_findings,
    index_dataset,
    reads_root_as_image_folder,
)
from saft.data.storage import ObjectNotFoundError, Storage, open_storage, sha256_bytes
from saft.progress import progress_bar

log = logging.getLogger(__name__)

READ_WORKERS = 16
"""Threads reading files at once: enough to hide S3 request latency, few enough for a pod's CPUs."""

E = TypeVar("E", bound=LabelledPath)
T = TypeVar("T")
R = TypeVar("R")

FileResult = tuple[list[Finding], "str | None"]
"""What :func:`check_file` returns: the file's findings and the sha256 of its bytes (None when unread)."""


def check_file(
    storage: Storage, relpath: str, expected_sha256: str | None = None, *, keep: bool = False
) -> FileResult:
    """Read one file once and check it: path, bytes, hash, decoding.

    Returns its findings and the sha256 of its bytes when they could be read (also for a
    file that does not decode). ``keep`` files remotely read bytes in the blob cache
    (:meth:`Storage.load_bytes`).
    """
    try:
        check_relpath(relpath)
        data = storage.load_bytes(relpath, expected_sha256, keep=keep)
    except UnsafePathError as err:
        return [Finding("unsafe_path", relpath, str(err))], None
    except (ObjectNotFoundError, FileNotFoundError):
        return [Finding("missing_file", relpath)], None
    except OSError as err:
        return [Finding("unreadable", relpath, f"{type(err).__name__}: {err}")], None
    digest = sha256_bytes(data)
    findings: list[Finding] = []
    if expected_sha256 is not None and digest != expected_sha256:
        findings.append(Finding("hash_mismatch", relpath,
                                f"{storage.uri_for(relpath)} has sha256 {digest}, the manifest says {expected_sha256}"))
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


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``fn`` over ``items`` in ``workers`` threads, results in input order.

    At most ``4 * workers`` calls are queued at a time, so a split of a million files does
    not become a million futures; if a call raises, the queued ones are cancelled.
    """
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 4 * max(1, workers):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def check_files(
    storage: Storage,
    items: Sequence[LabelledPath],
    *,
    workers: int = READ_WORKERS,
    keep: bool = False,
    progress: Any = None,
) -> list[FileResult]:
    """:func:`check_file` for each item (with its ``sha256`` when it has one), in item order.

    ``progress`` is a progress bar (``saft.progress.progress_bar``) advanced once per file.
    """

    def check(item: LabelledPath) -> FileResult:
        return check_file(storage, item.path, getattr(item, "sha256", None), keep=keep)

    results: list[FileResult] = []
    for result in ordered_map(check, items, workers):
        results.append(result)
        if progress is not None:
            progress.update(1)
    return results


def duplicate_findings(items: Sequence[LabelledPath], results: Sequence[FileResult]) -> list[Finding]:
    """Identical bytes among ``items``: ``duplicate`` within one class, ``conflicting_duplicate`` across classes.

    Only images that decode count: two copies of the same garbage in two classes say
    nothing about the labels, and broken files are dropped or replaced anyway. The first
    item (in the given order) with some bytes is the original; each later one with the
    same bytes is reported, naming it.
    """
    findings: list[Finding] = []
    first_seen: dict[str, LabelledPath] = {}
    for item, (file_findings, digest) in zip(items, results):
        if digest is None or any(finding.kind == "corrupt" for finding in file_findings):
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
    return findings


def validate_root(
    root: str | os.PathLike | Storage,
    entries: Iterable[LabelledPath] | None = None,
    *,
    expected_classes: Sequence[str] | None = None,
    workers: int = READ_WORKERS,
    keep: bool = False,
    progress: bool = True,
) -> ValidationReport:
    """Check a dataset root, or the given entries (e.g. a manifest) under it.

    Without ``entries`` the root is scanned as an ImageFolder. Entries that carry a
    ``sha256`` (manifest entries) are also checked against it. With ``expected_classes``
    the classes found are compared with that list; in entry mode a class with no entry
    counts as missing. ``keep`` files what is read from a remote root in the blob cache.
    """
    storage = open_storage(root)
    if entries is None:
        folder = scan_image_folder(storage)
        problems = empty_class_findings(folder) + class_findings(folder.classes, expected_classes)
        return _check_items(storage, list(folder.entries), folder.classes, problems, workers, keep, progress)
    items = list(entries)
    found = tuple(sorted({item.class_name for item in items}))
    return _check_items(storage, items, found, class_findings(found, expected_classes), workers, keep, progress)


def _check_items(
    storage: Storage,
    items: list[LabelledPath],
    found: tuple[str, ...],
    findings: list[Finding],
    workers: int,
    keep: bool,
    progress: bool,
    *,
    listed_unsafe: frozenset[str] = frozenset(),
    desc: str = "checking images",
) -> ValidationReport:
    """Read and check ``items`` (except ``listed_unsafe`` paths, whose listing was already
    refused) and report ``findings`` followed by what the reads found."""
    readable = [item for item in items if item.path not in listed_unsafe]
    with progress_bar(total=len(readable), desc=desc, unit="img", enabled=progress) as bar:
        results = check_files(storage, readable, workers=workers, keep=keep, progress=bar)
    findings = list(findings)
    for file_findings, _ in results:
        findings += file_findings
    findings += duplicate_findings(readable, results)
    return ValidationReport(root=storage.uri, files_checked=len(items), classes=found, findings=findings)


# --- one split of a named dataset ----------------------------------------------------------


@dataclass(frozen=True)
class DatasetCheck(DatasetIndex):
    """One split of a dataset as its adapter indexes it (see :class:`DatasetIndex`), and what
    validation found there, the listing's problems included."""

    report: ValidationReport


def validate_dataset(
    root: str | os.PathLike | Storage,
    dataset: str | DatasetAdapter = "imagefolder",
    split: str | None = None,
    *,
    workers: int = READ_WORKERS,
    progress: bool = True,
) -> DatasetCheck:
    """Index ``split`` (default: the dataset's default split) with the adapter and check every image.

    The listing is checked first (:func:`saft.data.split_index.index_dataset`: classes
    the split must cover, unsafe paths), then every indexed image is read and decoded as
    :func:`validate_root` does. A plain ImageFolder root is checked as a whole, exactly as
    :func:`validate_root` checks it. Raises :class:`~saft.data.adapters.AdapterError`
    (unknown dataset or split, or a root that does not match the layout) before any image
    is read.
    """
    storage = open_storage(root)
    index = index_dataset(storage, dataset, split)
    unsafe = frozenset(finding.subject for finding in index.problems if finding.kind == "unsafe_path")
    report = _check_items(storage, list(index.entries), index.listed, list(index.problems), workers, False, progress,
                          listed_unsafe=unsafe, desc=f"checking {index.dataset} {index.split}")
    fields = {name: getattr(index, name) for name in DatasetIndex.__dataclass_fields__}
    return DatasetCheck(**fields, report=report)


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
