"""The few-shot draw of ``saft data prepare``, reading only the images it picks.

A 16-shot ImageNet draw keeps 16,000 of 1.28 million training images, so reading (on S3:
downloading) and decoding the whole split to pick them costs 80 times what the pick
needs. :func:`draw_checked` reads just the drawn images: each class's images are taken
in their seeded sampling order (:func:`saft.data.fewshot.sampling_orders`), the first
``shots + val_shots`` are read and decode-checked, and their sha256 comes from the same
read. A broken one (unreadable, empty, not decodable, a symlink out of the root) is,
with ``replace_broken``, replaced by the next image of its class in that order, and so
on until the class has enough readable images.

Since the order depends only on the seed and the paths, the result is the draw over the
split with its broken images removed: the same inputs give the same manifests, a root
without broken images gives exactly the manifests a check of the whole split followed by
the draw gives, and smaller shot counts stay subsets of larger ones.

What a draw cannot see is what it does not read: broken or duplicated images that were
not drawn. Identical bytes filed under two classes are caught among the images read;
``saft data validate`` checks the whole split.

:func:`listed_entries` and :func:`refuse_bad_draw` hold what ``prepare`` refuses before
and after the reads, with messages that say what ``skip_corrupt`` can and cannot fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from saft.data.fewshot import FewShotSplit, few_shot_split, sampling_orders
from saft.data.findings import CLASS_ERRORS, FILE_ERRORS, DataValidationError, Finding, ValidationReport
from saft.data.imagefolder import ImageEntry
from saft.data.manifest import ManifestEntry
from saft.data.split_index import DatasetIndex
from saft.data.storage import Storage
from saft.data.validate import READ_WORKERS, FileResult, check_files, duplicate_findings
from saft.progress import progress_bar

log = logging.getLogger("saft.data.prepare")  # what it logs is the prepare step's news


@dataclass(frozen=True)
class CheckedDraw:
    """A few-shot split of manifest entries (sha256 from the read that checked each image),
    what the reads found (``report``: files read, their findings) and which classes came
    out short (``short``: class key -> readable images found, when fewer than ``need``)."""

    split: FewShotSplit
    report: ValidationReport
    short: dict[str, int]
    need: int

    @property
    def broken(self) -> set[str]:
        """Paths of the drawn images that could not be used."""
        return self.report.bad_paths()


def draw_checked(
    storage: Storage,
    entries: Sequence[ImageEntry],
    classes: Sequence[str],
    shots: int,
    seed: int,
    *,
    val_shots: int = 0,
    replace_broken: bool = False,
    keep: bool = True,
    workers: int = READ_WORKERS,
    progress: bool = True,
) -> CheckedDraw:
    """Draw ``shots`` + ``val_shots`` images of each class of ``classes``, reading only those.

    Reads go through :func:`saft.data.validate.check_files` in rounds: the first round
    reads each class's first ``shots + val_shots`` images; without ``replace_broken`` the
    draw stops there, and any broken image is in the report for the caller to refuse.
    With it, each later round reads, for every class still short, as many next images as
    it lacks. ``keep`` files the images read from a remote root in the blob cache, where
    training finds them. Raises :class:`saft.data.FewShotError` before reading anything
    when a class of ``classes`` has no images or fewer than ``shots + val_shots``.
    """
    need = shots + val_shots
    orders = sampling_orders(entries, seed, need=need, classes=classes)
    taken = {name: 0 for name in orders}
    usable: dict[str, list[ManifestEntry]] = {name: [] for name in orders}
    read: list[ImageEntry] = []
    results: list[FileResult] = []
    findings: list[Finding] = []
    with progress_bar(total=need * len(orders), desc="reading drawn images", unit="img", enabled=progress) as bar:
        while True:
            batch: list[ImageEntry] = []
            for name, order in orders.items():
                more = order[taken[name] : taken[name] + need - len(usable[name])]
                taken[name] += len(more)
                batch.extend(more)
            if not batch:
                break
            broken = 0
            # A class's candidates are consecutive in its order and results come back in
            # batch order, so each class's usable images stay in sampling order.
            batch_results = check_files(storage, batch, workers=workers, keep=keep, progress=bar)
            read += batch
            results += batch_results
            for entry, (file_findings, digest) in zip(batch, batch_results):
                findings += file_findings
                if any(finding.kind in FILE_ERRORS for finding in file_findings) or digest is None:
                    broken += 1
                else:
                    usable[entry.class_name].append(
                        ManifestEntry(entry.path, entry.label, entry.class_name, digest)
                    )
            if not broken or not replace_broken:
                break
            bar.total += broken
            bar.refresh()
    findings += duplicate_findings(read, results)
    report = ValidationReport(root=storage.uri, files_checked=len(read), classes=tuple(orders), findings=findings)
    train = [entry for picked in usable.values() for entry in picked[:shots]]
    val = [entry for picked in usable.values() for entry in picked[shots:need]]
    short = {name: len(picked) for name, picked in usable.items() if len(picked) < need}
    return CheckedDraw(few_shot_split(shots, seed, train, val), report, short, need)


# --- what prepare refuses ------------------------------------------------------------------


def _where(storage: Storage, index: DatasetIndex) -> str:
    return f"dataset root {storage.uri} ({index.dataset}, split {index.split!r})"


def listed_entries(storage: Storage, index: DatasetIndex, skip: bool) -> tuple[list[ImageEntry], int]:
    """The split's entries a draw may pick from, and how many unsafe paths were left out.

    Raises :class:`DataValidationError` when the listing shows class problems (never
    skippable) or unsafe paths (unless ``skip``, which leaves them out).
    """
    report = ValidationReport(root=storage.uri, files_checked=0, classes=index.listed, findings=list(index.problems))
    if any(finding.kind in CLASS_ERRORS for finding in report.errors):
        raise DataValidationError(report, _class_problem_message(_where(storage, index)))
    unsafe = report.bad_paths()
    if unsafe and not skip:
        raise DataValidationError(
            report,
            f"{_where(storage, index)} lists paths that leave the dataset root; fix them, or pass skip_corrupt=True "
            "(CLI: --skip-corrupt) to leave those files out of the draw",
        )
    if unsafe:
        log.warning("%s: left %d unsafe path(s) out of the draw", storage.uri, len(unsafe))
    return [entry for entry in index.entries if entry.path not in unsafe], len(unsafe)


def _class_problem_message(where: str) -> str:
    return (
        f"{where} failed validation: its classes are not what the dataset needs (missing, extra or empty "
        "classes, or one image filed under two classes). Fix the root or point it at a complete copy; "
        "skip_corrupt (CLI: --skip-corrupt) only replaces broken files and cannot fix these"
    )


def refuse_bad_draw(storage: Storage, index: DatasetIndex, draw: CheckedDraw, skip: bool) -> None:
    """Log the draw's warnings and replacements; raise :class:`DataValidationError` when its
    reads found class problems, broken images (unless ``skip``) or too few readable ones."""
    report = draw.report
    where = _where(storage, index)
    for finding in report.warnings:
        log.warning("%s: %s %s (%s)", storage.uri, finding.kind, finding.subject, finding.detail)
    if any(finding.kind in CLASS_ERRORS for finding in report.errors):
        raise DataValidationError(report, _class_problem_message(where))
    broken = draw.broken
    if broken and not skip:
        raise DataValidationError(
            report,
            f"{where}: {len(broken)} of the {report.files_checked} drawn image(s) are broken; fix or remove the "
            "files listed below, or pass skip_corrupt=True (CLI: --skip-corrupt) to replace each with the next "
            "image of its class in the seeded sampling order",
        )
    if broken:
        kinds = ", ".join(f"{kind}: {report.count(kind)}" for kind in FILE_ERRORS if report.count(kind))
        examples = ", ".join(sorted(broken)[:5]) + (", ..." if len(broken) > 5 else "")
        log.warning("%s: replaced %d broken drawn image(s) with the next images of their classes (%s): %s",
                    storage.uri, len(broken), kinds, examples)
    if draw.short:
        listed = ", ".join(f"{name!r} ({count})" for name, count in sorted(draw.short.items())[:10])
        raise DataValidationError(
            report,
            f"{where}: after replacing broken images, {len(draw.short)} class(es) have fewer than {draw.need} readable "
            f"images (shots + val_shots): {listed}; fix the files listed below or lower shots/val_shots",
        )

