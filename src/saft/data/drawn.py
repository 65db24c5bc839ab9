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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from saft.data.fewshot import FewShotSplit, few_shot_split, sampling_orders
from saft.data.findings import FILE_ERRORS, Finding, ValidationReport
from saft.data.imagefolder import ImageEntry
from saft.data.manifest import ManifestEntry
from saft.data.storage import Storage
from saft.data.validate import READ_WORKERS, FileResult, check_files, duplicate_findings
from saft.progress import progress_bar


@dataclass(frozen=True)
class CheckedDraw:
    """A few-shot split of manifest entries (sha256 from the read that checked each image),
    what the reads found (``report``: files read, their findings) and which classes came
    out short (``short``: class key -> readable images found, when fewer than needed)."""

    split: FewShotSplit
    report: ValidationReport
    short: dict[str, int]

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
    return CheckedDraw(few_shot_split(shots, seed, train, val), report, short)
