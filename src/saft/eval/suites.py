"""Evaluation suites: which datasets, where, and in which role.

Built-in suites follow the published protocols; each dataset's root defaults to a folder
under one ``data_root`` (the layout of the few-shot benchmark's DATASETS guide), and any
entry can be pointed elsewhere. A user suite is a YAML file::

    name: my-shifts
    datasets:
      - {name: imagenet, dataset: imagenet, root: s3://bucket/imagenet, split: val, role: id}
      - {name: my-sketches, dataset: imagefolder, root: /data/sketches, role: ood}

``role`` is ``id``/``ood`` or ``base``/``new`` (base-to-new: only that half of the
classes is scored, predictions restricted to the half). Relative roots are taken
relative to ``data_root``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from saft.eval.metrics import ROLES

COOP_DATASETS = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
                 "sun397", "dtd", "eurosat", "ucf101")
DEFAULT_FOLDERS = {
    "imagenet": "imagenet/images",
    "imagenet-v2": "imagenetv2",
    "imagenet-sketch": "imagenet-sketch",
    "imagenet-a": "imagenet-adversarial",
    "imagenet-r": "imagenet-rendition",
    "caltech101": "caltech-101",
    "oxford_pets": "oxford_pets",
    "stanford_cars": "stanford_cars",
    "oxford_flowers": "oxford_flowers",
    "food101": "food-101",
    "fgvc_aircraft": "fgvc_aircraft",
    "sun397": "sun397",
    "dtd": "dtd",
    "eurosat": "eurosat",
    "ucf101": "ucf101",
}


class SuiteError(ValueError):
    """A suite definition that cannot be used (the message names the file and entry)."""


@dataclass(frozen=True)
class SuiteEntry:
    name: str  # how the dataset appears in metrics and reports
    dataset: str  # adapter name
    role: str
    root: str = ""
    split: str | None = None  # None: the adapter's test split (or its default)

    def resolved(self, data_root: str | None) -> "SuiteEntry":
        root = self.root or DEFAULT_FOLDERS.get(self.dataset, self.dataset)
        if "://" in root or Path(root).is_absolute() or not data_root:
            return replace(self, root=root)
        sep = "" if data_root.endswith("/") else "/"
        return replace(self, root=f"{data_root}{sep}{root}" if "://" in data_root else str(Path(data_root) / root))


@dataclass(frozen=True)
class Suite:
    name: str
    entries: tuple[SuiteEntry, ...]

    def resolved(self, data_root: str | None) -> "Suite":
        return Suite(self.name, tuple(e.resolved(data_root) for e in self.entries))


def _imagenet_shifts() -> Suite:
    return Suite("imagenet-shifts", (
        SuiteEntry("imagenet", "imagenet", "id", split="val"),
        SuiteEntry("imagenet-v2", "imagenet-v2", "ood"),
        SuiteEntry("imagenet-sketch", "imagenet-sketch", "ood"),
        SuiteEntry("imagenet-a", "imagenet-a", "ood"),
        SuiteEntry("imagenet-r", "imagenet-r", "ood"),
    ))


def _base2new() -> Suite:
    entries = []
    for ds in ("imagenet",) + COOP_DATASETS:
        split = "val" if ds == "imagenet" else "test"
        entries += [SuiteEntry(f"{ds}/base", ds, "base", split=split), SuiteEntry(f"{ds}/new", ds, "new", split=split)]
    return Suite("base2new", tuple(entries))


def _cross_dataset() -> Suite:
    return Suite("cross-dataset", (SuiteEntry("imagenet", "imagenet", "id", split="val"),)
                 + tuple(SuiteEntry(ds, ds, "ood", split="test") for ds in COOP_DATASETS))


BUILTIN_SUITES = {"imagenet-shifts": _imagenet_shifts, "base2new": _base2new, "cross-dataset": _cross_dataset}


def load_suite(name_or_path: str, data_root: str | None = None) -> Suite:
    """A built-in suite by name, or a user suite from a YAML file; roots resolved."""
    if name_or_path in BUILTIN_SUITES:
        return BUILTIN_SUITES[name_or_path]().resolved(data_root)
    path = Path(name_or_path)
    if not path.is_file():
        raise SuiteError(f"unknown suite {name_or_path!r}: use one of {', '.join(BUILTIN_SUITES)} "
                         "or the path of a suite YAML file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), list) or not doc["datasets"]:
        raise SuiteError(f"{path}: expected a mapping with a non-empty 'datasets' list")
    entries, seen = [], set()
    for i, item in enumerate(doc["datasets"], start=1):
        where = f"{path}, datasets item {i}"
        if not isinstance(item, dict):
            raise SuiteError(f"{where}: expected a mapping with dataset, role and root")
        unknown = set(item) - {"name", "dataset", "role", "root", "split"}
        if unknown:
            raise SuiteError(f"{where}: unknown field(s) {sorted(unknown)}")
        dataset, role = item.get("dataset", "imagefolder"), item.get("role")
        if role not in ROLES:
            raise SuiteError(f"{where}: field 'role' must be one of {', '.join(ROLES)}, got {role!r}")
        name = str(item.get("name") or dataset)
        if name in seen:
            raise SuiteError(f"{where}: name {name!r} is used twice; give each entry its own 'name'")
        seen.add(name)
        entries.append(SuiteEntry(name, dataset, role, str(item.get("root", "")), item.get("split")))
    roles = {e.role for e in entries}
    if ("base" in roles) != ("new" in roles):
        raise SuiteError(f"{path}: a base-to-new suite needs both 'base' and 'new' entries")
    return Suite(str(doc.get("name") or path.stem), tuple(entries)).resolved(data_root)
