"""JSON-lines manifests: the exact list of files (and their bytes) a step trained on.

Each line is one object with the keys ``path`` (relative posix path under the dataset
root), ``label``, ``class_name`` and ``sha256``. Lines are sorted by path and written
with sorted keys and fixed separators, so the same inputs give byte-identical files on
every machine, and :func:`manifest_hash` (sha256 of the file bytes) can serve as a cache
key for pipeline steps and as the data version recorded with a model.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

from saft.data.paths import UnsafePathError, check_relpath
from saft.data.storage import Storage, check_sha256, open_storage, sha256_bytes, sha256_file
from saft.io import atomic_path

MANIFEST_KEYS: frozenset[str] = frozenset({"path", "label", "class_name", "sha256"})


class ManifestError(ValueError):
    """A manifest (file or entry list) is malformed; the message names file, line and field."""


class LabelledPath(Protocol):
    """Anything with the fields of an image entry (ImageEntry, ManifestEntry)."""

    @property
    def path(self) -> str: ...

    @property
    def label(self) -> int: ...

    @property
    def class_name(self) -> str: ...


@dataclass(frozen=True)
class ManifestEntry:
    """One manifest line: an image, its label, and the sha256 of its bytes."""

    path: str
    label: int
    class_name: str
    sha256: str

    def to_json(self) -> str:
        """The canonical single-line form written to manifest files."""
        record = {"class_name": self.class_name, "label": self.label, "path": self.path, "sha256": self.sha256}
        return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _check_fields(record: dict, where: str) -> ManifestEntry:
    missing = sorted(MANIFEST_KEYS - record.keys())
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(record.keys() - MANIFEST_KEYS)
    if unknown:
        raise ManifestError(
            f"{where}: unknown field(s) {', '.join(unknown)}; allowed are {', '.join(sorted(MANIFEST_KEYS))}"
        )
    path, label, class_name, sha = record["path"], record["label"], record["class_name"], record["sha256"]
    try:
        check_relpath(path)
    except UnsafePathError as err:
        raise ManifestError(f"{where}: field 'path': {err}") from None
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ManifestError(f"{where}: field 'label' must be a non-negative integer, got {label!r}")
    if not isinstance(class_name, str) or not class_name:
        raise ManifestError(f"{where}: field 'class_name' must be a non-empty string, got {class_name!r}")
    try:
        check_sha256(sha)
    except ValueError as err:
        raise ManifestError(f"{where}: field 'sha256': {err}") from None
    return ManifestEntry(path=path, label=label, class_name=class_name, sha256=sha)


def _check_consistency(entries: Sequence[ManifestEntry], wheres: Sequence[str]) -> None:
    """Paths must be unique and each label must always carry the same class name."""
    seen_path: dict[str, str] = {}
    name_of: dict[int, tuple[str, str]] = {}
    label_of: dict[str, tuple[int, str]] = {}
    for entry, where in zip(entries, wheres):
        if entry.path in seen_path:
            raise ManifestError(f"{where}: path {entry.path!r} already listed at {seen_path[entry.path]}")
        seen_path[entry.path] = where
        if entry.label in name_of and name_of[entry.label][0] != entry.class_name:
            first_name, first_where = name_of[entry.label]
            raise ManifestError(
                f"{where}: label {entry.label} is class {entry.class_name!r} here but "
                f"{first_name!r} at {first_where}"
            )
        if entry.class_name in label_of and label_of[entry.class_name][0] != entry.label:
            first_label, first_where = label_of[entry.class_name]
            raise ManifestError(
                f"{where}: class {entry.class_name!r} has label {entry.label} here but "
                f"{first_label} at {first_where}"
            )
        name_of.setdefault(entry.label, (entry.class_name, where))
        label_of.setdefault(entry.class_name, (entry.label, where))


def canonical_manifest_bytes(entries: Iterable[ManifestEntry]) -> bytes:
    """The exact bytes :func:`write_manifest` writes: entries checked and sorted by path."""
    ordered = sorted(entries, key=lambda entry: entry.path)
    checked = [
        _check_fields(
            {"path": e.path, "label": e.label, "class_name": e.class_name, "sha256": e.sha256},
            f"manifest entry {e.path!r}",
        )
        for e in ordered
    ]
    _check_consistency(checked, [f"manifest entry {e.path!r}" for e in checked])
    return "".join(entry.to_json() + "\n" for entry in checked).encode("utf-8")


def write_manifest(path: str | os.PathLike, entries: Iterable[ManifestEntry]) -> str:
    """Write a manifest atomically and return its :func:`manifest_hash`.

    Every entry is checked before the first byte is written, and the file appears under
    its name only when complete, so a failure leaves any earlier manifest untouched.
    """
    data = canonical_manifest_bytes(entries)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return sha256_bytes(data)


def manifest_hash(path: str | os.PathLike) -> str:
    """sha256 of the manifest file's bytes: the data version of a step's input."""
    return sha256_file(path)


def read_manifest(path: str | os.PathLike, *, allow_empty: bool = False) -> list[ManifestEntry]:
    """Read and check a manifest; :class:`ManifestError` names the file and line of any problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ManifestError(f"{path}:{line}: not valid UTF-8 ({err.reason})") from None
    entries: list[ManifestEntry] = []
    wheres: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            raise ManifestError(f"{where}: blank line; every line must be one JSON object")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
        entries.append(_check_fields(record, where))
        wheres.append(where)
    if not entries and not allow_empty:
        raise ManifestError(f"manifest {path} has no entries")
    _check_consistency(entries, wheres)
    return entries


def manifest_classes(entries: Iterable[LabelledPath]) -> dict[int, str]:
    """Label -> class name, as used by the entries (sorted by label)."""
    mapping: dict[int, str] = {}
    for entry in entries:
        mapping.setdefault(entry.label, entry.class_name)
    return dict(sorted(mapping.items()))


def check_class_names(entries: Iterable[LabelledPath], classes: Sequence[str], source: str) -> None:
    """Raise :class:`ManifestError` unless every label's class matches ``classes[label]``.

    Prompts are built from the class list (``classes.json``) and the loss compares them
    with the manifest's labels, so a manifest from another prepare run, or an edited class
    list, trains label i towards the wrong text without any error. A manifest class may be
    the plain name or its disambiguated key ``"name (id)"`` (see
    :func:`saft.data.validate.class_keys`).
    """
    classes = list(classes)
    for label, name in manifest_classes(entries).items():
        if label >= len(classes):
            raise ManifestError(
                f"{source}: label {label} (class {name!r}) is outside the class list of {len(classes)} "
                "class(es); the manifest and the class list come from different datasets or prepare runs. "
                "Prepare the data folder again."
            )
        expected = classes[label]
        if name != expected and not (name.startswith(f"{expected} (") and name.endswith(")")):
            raise ManifestError(
                f"{source}: label {label} is class {name!r} in the manifest but {expected!r} in the class list; "
                "the manifest and the class list come from different prepare runs (or one was edited). "
                "Prepare the data folder again."
            )


def hash_entries(
    root: str | os.PathLike | Storage, entries: Iterable[LabelledPath], *, workers: int = 8
) -> list[ManifestEntry]:
    """Manifest entries for image entries, with the sha256 of each file's bytes.

    For S3 roots hashing downloads each file into the local cache, where training finds
    it later. Any unreadable or unsafe file raises, naming it, before anything is written.
    """
    storage = open_storage(root)
    items = list(entries)
    for item in items:
        try:
            check_relpath(item.path)
        except UnsafePathError as err:
            raise ManifestError(f"entry for class {item.class_name!r}: {err}") from None
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = list(pool.map(lambda item: storage.sha256(item.path), items))
    return [
        ManifestEntry(path=item.path, label=item.label, class_name=item.class_name, sha256=digest)
        for item, digest in zip(items, digests)
    ]
