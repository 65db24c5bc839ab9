"""What a data check found: problem kinds, findings, the report and the error that carries it.

The checks themselves live in :mod:`saft.data.validate` (whole roots, manifests, dataset
splits) and :mod:`saft.data.drawn` (only the images a few-shot draw picks); both report
through these classes, so ``saft data validate``, ``saft data prepare`` and the datasets
print the same summary.

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

from dataclasses import dataclass, field

FILE_ERRORS: tuple[str, ...] = (
    "unsafe_path",
    "missing_file",
    "unreadable",
    "zero_byte",
    "corrupt",
    "hash_mismatch",
)
"""Problems confined to one file: :func:`saft.data.validate.skip_corrupt` may drop such files,
and a few-shot draw may replace them (:mod:`saft.data.drawn`)."""

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


@dataclass(frozen=True)
class Finding:
    """One problem: its kind, the file or class it concerns, and what exactly is wrong."""

    kind: str
    subject: str
    detail: str = ""


@dataclass
class ValidationReport:
    """Everything a check found, grouped by kind; ``files_checked`` is how many files it read."""

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
        """Paths with a file-level error (what :func:`saft.data.validate.skip_corrupt` drops)."""
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
