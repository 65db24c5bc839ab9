"""Evaluation suites: which datasets, where, and in which role.

Built-in suites follow the published protocols; each dataset's root defaults to a folder
under one ``data_root`` (the layout of the few-shot benchmark's DATASETS guide), and any
entry can be pointed elsewhere. A user suite is a YAML file::

    name: my-shifts
    datasets:
      - {name: imagenet, dataset: imagenet, root: s3://bucket/imagenet, split: val, role: id}
      - {name: my-sketches, dataset: imagefolder, root: /data/sketches, role: ood}

``role`` is ``id``/``ood``, ``base``/``new`` or ``id_subset``. Relative roots are taken
relative to ``data_root``. Optional fields: ``split`` (default: the adapter's test split),
``group`` and, at the top level, ``reference`` (the effective-robustness reference fit,
see :mod:`saft.eval.robustness`; built-in ``imagenet-shifts`` uses ``taori2020-testbed``).

Base-to-new (CoOp/CoCoOp protocol): a ``base`` and a ``new`` entry of the same dataset form
one ``group`` (default: the entry name without a trailing ``/base`` or ``/new``, else its
root). Each half is scored with a zero-shot head over its own classes only, the first
ceil(n/2) classes in label order being base (:func:`saft.data.fewshot.split_base_new`,
the rule ``prepare --subset base`` trains on). Every group needs exactly one of each.

``id_subset``: the ID dataset restricted to the classes of the shift named by ``group``
(ImageNet-A/-R cover 200 of ImageNet's 1000), predictions restricted to them. It is the
x-axis of that shift's effective robustness (Taori et al. 2020) and enters no mean.
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
    group: str | None = None  # base/new: the dataset the halves belong to; id_subset: the shift

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
    reference: str = ""  # default effective-robustness reference ("" : none)

    def resolved(self, data_root: str | None) -> "Suite":
        return replace(self, entries=tuple(e.resolved(data_root) for e in self.entries))

    @property
    def roles(self) -> set[str]:
        return {e.role for e in self.entries}

    def base_to_new_groups(self) -> dict[str, tuple[SuiteEntry, SuiteEntry]]:
        """group -> (base entry, new entry), in suite order."""
        out: dict[str, tuple[SuiteEntry, SuiteEntry]] = {}
        for e in self.entries:
            if e.role == "base":
                out[e.group] = (e, next(n for n in self.entries if n.role == "new" and n.group == e.group))
        return out

    def entry(self, name: str) -> SuiteEntry:
        return next(e for e in self.entries if e.name == name)


def _imagenet_shifts() -> Suite:
    return Suite("imagenet-shifts", (
        SuiteEntry("imagenet", "imagenet", "id", split="val"),
        SuiteEntry("imagenet-v2", "imagenet-v2", "ood"),
        SuiteEntry("imagenet-sketch", "imagenet-sketch", "ood"),
        SuiteEntry("imagenet-a", "imagenet-a", "ood"),
        SuiteEntry("imagenet-r", "imagenet-r", "ood"),
        # the x-axis of -A/-R's effective robustness: ImageNet val on their 200 classes
        SuiteEntry("imagenet@a-classes", "imagenet", "id_subset", split="val", group="imagenet-a"),
        SuiteEntry("imagenet@r-classes", "imagenet", "id_subset", split="val", group="imagenet-r"),
    ), reference="taori2020-testbed")


def _base2new() -> Suite:
    entries = []
    for ds in ("imagenet",) + COOP_DATASETS:
        split = "val" if ds == "imagenet" else "test"
        entries += [SuiteEntry(f"{ds}/base", ds, "base", split=split, group=ds),
                    SuiteEntry(f"{ds}/new", ds, "new", split=split, group=ds)]
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
        unknown = set(item) - {"name", "dataset", "role", "root", "split", "group"}
        if unknown:
            raise SuiteError(f"{where}: unknown field(s) {sorted(unknown)}")
        dataset, role = item.get("dataset", "imagefolder"), item.get("role")
        if role not in ROLES:
            raise SuiteError(f"{where}: field 'role' must be one of {', '.join(ROLES)}, got {role!r}")
        name = str(item.get("name") or dataset)
        if name in seen:
            raise SuiteError(f"{where}: name {name!r} is used twice; give each entry its own 'name'")
        seen.add(name)
        root = str(item.get("root", ""))
        group = item.get("group")
        if role in ("base", "new") and not group:
            group = name.rsplit("/", 1)[0] if name.endswith(("/base", "/new")) else (root or dataset)
        entries.append(SuiteEntry(name, dataset, role, root, item.get("split"),
                                  None if group is None else str(group)))
    _check_groups(path, entries)
    reference = doc.get("reference") or ""
    return Suite(str(doc.get("name") or path.stem), tuple(entries), str(reference)).resolved(data_root)


def suite_document(suite: Suite) -> dict:
    """``suite`` as the mapping of a suite YAML file; :func:`load_suite` reads it back to the same suite.

    Used to hand a resolved suite (absolute roots) to a ``saft evaluate`` command line.
    """
    keys = ("name", "dataset", "role", "root", "split", "group")
    return {"name": suite.name, "reference": suite.reference,
            "datasets": [{k: getattr(e, k) for k in keys if getattr(e, k) is not None} for e in suite.entries]}


def _check_groups(path: Path, entries: list[SuiteEntry]) -> None:
    """Every base-to-new group has one base and one new entry; every id_subset names an OOD entry."""
    halves: dict[str, list[str]] = {}
    for e in entries:
        if e.role in ("base", "new"):
            halves.setdefault(e.group, []).append(e.role)
    for group, roles in halves.items():
        if sorted(roles) != ["base", "new"]:
            raise SuiteError(f"{path}: base-to-new group {group!r} has {', '.join(sorted(roles))} entries; each "
                             "dataset needs exactly one 'base' and one 'new' entry (set 'group' to pair them)")
    ood = {e.name for e in entries if e.role == "ood"}
    for e in entries:
        if e.role == "id_subset" and e.group not in ood:
            raise SuiteError(f"{path}: entry {e.name!r} (role id_subset) needs 'group' naming an OOD entry of the "
                             f"suite whose classes it covers; OOD entries: {', '.join(sorted(ood)) or 'none'}")
