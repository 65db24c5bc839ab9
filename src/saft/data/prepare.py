"""The prepare step: from a dataset root to the files every later step reads.

``prepare_dataset`` turns a root (local folder or ``s3://bucket/prefix``) of any trainable
dataset of the adapter registry (:func:`saft.data.adapters.list_adapters`: a plain
ImageFolder, ImageNet, the CoOp datasets) into a folder of small, versionable files:

- ``train.jsonl`` (and ``val.jsonl`` when ``val_shots > 0``): few-shot manifests, one
  image per line with its label, class name and sha256 (see :mod:`saft.data.manifest`)
- ``classes.json``: the class names in label order (position = label), as the dataset's
  adapter names them (folder names, CoOp split files, CLIP's ImageNet names); prompts
  are built from these
- ``templates.json``: the prompt templates that turn a class name into a caption; by
  default the dataset's own (e.g. CLIP's 80 ImageNet prompts), else the user's;
  evaluation builds its zero-shot heads from these
- ``train_templates.json``: the prompts scoring and training use; by default the
  dataset's one hand-crafted training prompt (ImageNet: ``a photo of a {}.``, as in the
  CoOp protocol), else the user's (see ``DatasetAdapter.train_templates``)
- ``prepare.json``: what was asked for and what came out (dataset adapter, split, root,
  shots, seed, val_shots, subset, manifest hashes, library version, and ``counts``:
  classes, ``images`` the draw chose from, images ``read``, broken ones skipped and
  replaced, train and val entries)

Why it is built this way:

- Images are drawn from one split of the dataset (its training split unless asked
  otherwise), indexed by the dataset's adapter, so a CoOp test image or an ImageNet
  validation image never ends up in a training manifest by accident. Evaluation-only
  sets (ImageNet-V2, -Sketch, -A, -R) are refused: training on them would turn their
  robustness numbers into in-distribution ones.
- Only the drawn images are read (:mod:`saft.data.drawn`): a 16-shot ImageNet draw reads
  16,000 of the split's 1.28 million images, not all of them. The split is listed by the
  dataset's adapter and everything the listing shows is checked for every image
  (missing, extra or empty classes, labels against the class list, unsafe paths; see
  :mod:`saft.data.split_index`); then each drawn image is read once, decoded (so a
  truncated JPEG is found now rather than hours into training) and hashed from the same
  bytes. A broken drawn image is refused unless ``skip_corrupt``; then it is replaced by
  the next image of its class in the seeded sampling order, counted and logged. The
  order depends only on the seed and the path, so the same inputs give the same
  manifests, and a split without broken images gives the manifests a check of the whole
  split followed by the draw would. Images that were not drawn are not read, so a broken
  one there, or the same bytes filed under two classes outside the draw, is not seen:
  ``saft data validate`` checks a whole split (:func:`saft.data.validate.validate_dataset`).
  From S3 the drawn images are also filed in the local blob cache, where training on the
  same machine finds them.
- The outputs are a set: ``prepare.json`` records the hashes of the manifests beside it.
  All inputs are read and checked, and every output is rendered to a temporary file,
  before any output replaces a file of the folder; a failure therefore leaves the folder
  as it was, never half of a new result next to half of an old one.
- Nothing depends on time, machine or output location, so the same inputs give
  byte-identical files, and ``prepare.json``'s hashes can key pipeline caches.

Subsets follow the base-to-new protocol (:func:`saft.data.fewshot.split_base_new`): of
the classes in label order the first ceil(n/2) are *base*, the rest *new*. With
``subset="base"`` or ``"new"`` only that half is kept and labels are renumbered from 0
within the half (for ``base`` this changes nothing; for ``new`` the first new class
becomes label 0), and ``classes.json`` lists only that half, so a classifier over the
half's classes uses the manifest labels directly.

Classes are told apart by label, not by name: CLIP's ImageNet names call two classes
"missile" and two "sunglasses". A manifest maps each class name to one label, so there a
repeated name carries its wnid (``"missile (n03773504)"``, see
:func:`saft.data.validate.class_keys`); ``classes.json`` keeps the plain names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from saft.config import did_you_mean
from saft.data.adapters import DatasetAdapter, UnknownDatasetError, get_adapter, list_adapters
from saft.data.drawn import draw_checked, listed_entries, refuse_bad_draw
from saft.data.fewshot import subsample_classes
from saft.data.manifest import canonical_manifest_bytes
from saft.data.split_index import index_dataset
from saft.data.storage import LocalStorage, Storage, open_storage, sha256_bytes
from saft.data.templates import DEFAULT_TEMPLATES, TemplateError, check_template, load_templates  # noqa: F401 (re-exported)
from saft.layout import PREPARED
from saft.config import ConfigError, check, setting
from saft.io import atomic_path, write_json
from saft.version import __version__

log = logging.getLogger(__name__)

SUPPORTED_DATASETS: tuple[str, ...] = tuple(list_adapters())
"""Dataset adapters ``prepare_dataset`` and ``saft data validate`` know (evaluation-only ones
can be validated but not prepared)."""

SUBSETS: tuple[str, ...] = ("all", "base", "new")



@dataclass
class PrepareConfig:
    """What a few-shot draw takes from a dataset root (``saft data prepare``, params.yaml ``data:``)."""

    dataset: str = setting("imagefolder", metavar="NAME",
                           help="dataset adapter that reads the root, one of: " + ", ".join(list_adapters())
                                + " (`saft data adapters` shows their layouts)")
    split: str = setting("", metavar="NAME", help="split to draw from; empty: the dataset's training split")
    shots: int = setting(16, minimum=1, metavar="K", help="training images per class")
    val_shots: int = setting(8, minimum=0, metavar="K",
                             help="ID validation images per class, disjoint from training (learning rates are "
                                  "chosen on them); 0 writes no val.jsonl")
    seed: int = setting(1, metavar="N", help="seed of the draw: the same seed draws the same images everywhere")
    subset: str = setting("all", choices=SUBSETS,
                          help="classes kept: all, base (the first half in label order: base-to-new) or new "
                               "(the second half, labels renumbered from 0)")
    templates: list[str] = setting(factory=list, metavar="TEMPLATE",
                                   help="evaluation prompt templates, each with one '{}' for the class name, or "
                                        "one file holding them (.json/.yaml list or one per line); empty: the "
                                        "dataset's own (imagenet: CLIP's 80)")
    train_templates: list[str] = setting(factory=list, metavar="TEMPLATE",
                                         help="prompts scoring and training use, in the same forms; empty: the "
                                              "dataset's training prompt ('a photo of a {}.')")
    skip_corrupt: bool = setting(False, help="replace broken drawn images with the next images of their classes in "
                                             "the seeded order instead of refusing the root")

    def __post_init__(self) -> None:
        try:
            check(self)
        except ConfigError as err:
            raise PrepareError(str(err)) from None


def template_source(items) -> Sequence[str] | str | os.PathLike | None:
    """A template setting as ``load_templates`` takes it: None (the dataset's), one file, or the templates."""
    if isinstance(items, (str, os.PathLike)):
        return items
    if not items:
        return None
    only = items[0] if len(items) == 1 else None
    if only is not None and "{}" not in only and (Path(only).suffix in TEMPLATE_FILE_SUFFIXES or "/" in only
                                                  or Path(only).expanduser().is_file()):
        return only  # one file holding the templates (the command line's --templates FILE)
    return list(items)


TEMPLATE_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".txt")


TRAIN_FILE = PREPARED.train
VAL_FILE = PREPARED.val
CLASSES_FILE = PREPARED.classes
TEMPLATES_FILE = PREPARED.templates
TRAIN_TEMPLATES_FILE = PREPARED.train_templates
RECORD_FILE = PREPARED.record
RECORD_FORMAT = "saft-prepare-v1"


class PrepareError(ValueError):
    """The prepare step cannot run with these arguments (the message says which and why)."""


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare_dataset` wrote, for summaries and for the next pipeline step."""

    out_dir: Path
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    train_count: int
    val_count: int
    skipped: int
    train_hash: str
    val_hash: str | None
    record: dict[str, Any]

    @property
    def manifest_hash(self) -> str:
        """The training manifest's sha256: the data version a fine-tuned model records."""
        return self.train_hash

    @property
    def files(self) -> dict[str, Path]:
        """Output name -> path, for the files this run wrote."""
        names = {"train": TRAIN_FILE, "classes": CLASSES_FILE, "templates": TEMPLATES_FILE, "record": RECORD_FILE}
        if self.val_hash is not None:
            names["val"] = VAL_FILE
        return {key: self.out_dir / name for key, name in names.items()}


def check_dataset(dataset: str) -> str:
    """Return ``dataset`` if an adapter exists for it, else raise naming the supported ones."""
    if dataset not in SUPPORTED_DATASETS:
        raise PrepareError(
            # 0.7: names of a family share letters and digits (cifar10 is no typo of ucf101)
            f"dataset {dataset!r} is not supported{did_you_mean(dataset, SUPPORTED_DATASETS, cutoff=0.7)}; "
            f"supported datasets: {', '.join(SUPPORTED_DATASETS)}. "
            "Arrange other datasets as <root>/<class name>/<image> and use 'imagefolder'"
        )
    return dataset


def trainable_adapter(dataset: str) -> DatasetAdapter:
    """The adapter of ``dataset``, refusing unknown and evaluation-only datasets.

    Raises :class:`PrepareError` for an unknown name and the adapter's
    :class:`~saft.data.adapters.EvalOnlyError` for ImageNet-V2, -Sketch, -A and -R.
    """
    check_dataset(dataset)
    try:
        adapter = get_adapter(dataset)
    except UnknownDatasetError as err:  # the registry changed since import
        raise PrepareError(str(err)) from None
    adapter.check_trainable()
    return adapter


def check_split(adapter: DatasetAdapter, split: object) -> str:
    """The split to draw from: ``split``, or the dataset's training (default) split when None."""
    if split is None:
        return adapter.default_split
    if not isinstance(split, str) or split not in adapter.splits:
        raise PrepareError(
            f"dataset {adapter.name!r} has no split {split!r}; its splits: {', '.join(adapter.splits)} "
            f"(default: {adapter.default_split})"
        )
    return split


def _warn_if_evaluation_split(adapter: DatasetAdapter, split: str) -> None:
    """Log a warning when ``split`` holds the images evaluation scores (e.g. ImageNet's val)."""
    test = adapter.spec.splits.get("test")
    if test is not None and adapter.spec.splits[split] == test:
        log.warning(
            "drawing training images from split %r of %s, which holds the images its evaluation scores "
            "(split 'test'); accuracy measured there will not be a held-out number",
            split, adapter.name,
        )


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PrepareError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


# --- the step ------------------------------------------------------------------------------


def _check_out_dir(out_dir: Path, storage: Storage) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepareError(f"output folder {out_dir} exists and is not a folder; choose another --out")
    if isinstance(storage, LocalStorage) and out_dir.resolve().is_relative_to(storage.root.resolve()):
        raise PrepareError(
            f"output folder {out_dir} is inside the dataset root {storage.root}, where it would be "
            "scanned as part of the dataset (an ImageFolder root would gain a class folder); "
            "write the outputs outside the root"
        )


def _commit(out_dir: Path, files: dict[str, bytes | list[str] | dict[str, Any]]) -> None:
    """Write all files beside their targets, then move them into place together.

    Each file goes to a temporary name first; only when every one is complete are they
    renamed over their targets (``prepare.json`` last, as it vouches for the others). If
    anything fails, the temporaries are removed and no target has changed. Values are
    manifest bytes or objects written with :func:`saft.io.write_json`.
    """
    order = [name for name in files if name != RECORD_FILE] + [RECORD_FILE]
    with contextlib.ExitStack() as stack:
        # ExitStack exits in reverse, so entering prepare.json first renames it last.
        for name in reversed(order):
            tmp = stack.enter_context(atomic_path(out_dir / name))
            content = files[name]
            if isinstance(content, bytes):
                tmp.write_bytes(content)
            else:
                write_json(tmp, content)
    if VAL_FILE not in files:  # a val manifest from an earlier run would contradict prepare.json
        with contextlib.suppress(FileNotFoundError):
            (out_dir / VAL_FILE).unlink()


def _spelled(name: str) -> str:
    """A class name as a prompt reads it: compatibility forms, case, spacing and separators ignored."""
    text = unicodedata.normalize("NFKC", name).casefold().replace("_", " ").replace("-", " ")
    return " ".join(text.split())


def check_class_names(classes: Sequence[str], where: str) -> list[str]:
    """Refuse what makes no classifier (fewer than two classes, control characters in a name) and return the
    warnings a user must see: names that read the same in a prompt (they get the same text embedding)."""
    if len(classes) < 2:
        raise PrepareError(f"{where} holds {len(classes)} class{'' if len(classes) == 1 else 'es'} "
                           f"({', '.join(map(repr, classes)) or 'none'}): a classifier needs at least two; check the "
                           "root (and --subset, which keeps half of the classes)")
    for name in classes:
        bad = [c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")]
        if bad or not name.strip():
            raise PrepareError(f"{where}: class name {name!r} holds control or invisible characters "
                               f"({', '.join(repr(c) for c in sorted(set(bad))) or 'only spaces'}); a prompt would "
                               "carry them into the text tower: rename the class folder (or fix the class list)")
    seen: dict[str, str] = {}
    warnings = []
    for name in classes:
        key = _spelled(name)
        if key in seen:
            warnings.append(f"classes {seen[key]!r} and {name!r} read the same in a prompt ({key!r}): their text "
                            "embeddings are identical, so the zero-shot head cannot tell them apart")
        else:
            seen[key] = name
    for text in warnings:
        log.warning("%s: %s", where, text)
    return warnings


def prepare_dataset(
    root: str | os.PathLike | Storage,
    out_dir: str | os.PathLike,
    config: PrepareConfig | None = None,
    *,
    progress: bool = True,
    **settings: Any,
) -> PrepareResult:
    """Draw ``shots`` images per class (``config``, or :class:`PrepareConfig` fields as keywords) of ``split`` of ``root`` for ``seed``, check them, write ``out_dir``.

    ``dataset`` names the adapter that reads the root (``saft.data.list_adapters()``);
    ``split`` defaults to the dataset's training split (``imagefolder``: the whole root).
    ``templates`` defaults to the dataset's prompt templates and ``train_templates`` to its
    training prompt (a list or a file, like ``templates``). Raises
    :class:`PrepareError` (bad arguments or templates), the adapter's
    :class:`~saft.data.adapters.EvalOnlyError` (evaluation-only dataset) or
    :class:`~saft.data.adapters.LayoutError` (root not laid out as the dataset expects),
    :class:`DataValidationError` (broken data in the listing or among the drawn images;
    its ``report`` lists every finding),
    :class:`saft.data.FewShotError` (a class has fewer than ``shots + val_shots`` images)
    or :class:`saft.data.StorageError` (unreadable root); in every case ``out_dir`` is
    left as it was. ``skip_corrupt`` replaces broken drawn images (module docstring);
    ``progress`` shows a bar of the images read when stderr is a terminal. See the module
    docstring for the files written.
    """
    cfg = config if config is not None else PrepareConfig(**settings)
    dataset, split, shots, seed = cfg.dataset, cfg.split or None, cfg.shots, cfg.seed
    val_shots, subset, skip_corrupt = cfg.val_shots, cfg.subset, cfg.skip_corrupt
    templates, train_templates = template_source(cfg.templates), template_source(cfg.train_templates)
    adapter = trainable_adapter(dataset)
    split = check_split(adapter, split)
    _check_int("shots", shots, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PrepareError(f"seed must be an integer, got {seed!r}")
    _check_int("val_shots", val_shots, 0)
    if subset not in SUBSETS:
        raise PrepareError(f"subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    # Before any data is read, so a typo fails fast.
    prompt_templates = load_templates(adapter.templates if templates is None else templates)
    training_templates = load_templates(adapter.train_templates if train_templates is None else train_templates)
    out = Path(out_dir).expanduser()
    storage = open_storage(root)
    _check_out_dir(out, storage)
    _warn_if_evaluation_split(adapter, split)

    index = index_dataset(storage, adapter, split)
    if not index.classes:
        raise PrepareError(
            f"dataset root {storage.uri} holds no class folders; expected the ImageFolder layout "
            "<root>/<class name>/<image>"
        )
    entries, skipped = listed_entries(storage, index, skip_corrupt)
    # Halves and shots are drawn per class key, so classes sharing a name stay apart.
    entries, keys = subsample_classes(entries, index.keys, subset)  # type: ignore[arg-type]
    draw = draw_checked(storage, entries, keys, shots, seed, val_shots=val_shots, replace_broken=skip_corrupt,
                        progress=progress)
    refuse_bad_draw(storage, index, draw, skip_corrupt)
    skipped += len(draw.broken)
    drawn = draw.split
    name_of = index.name_of_key
    classes = [name_of[key] for key in keys]
    name_warnings = check_class_names(classes, storage.uri)

    # Manifests are rendered in memory, so any failure here comes before the first byte
    # reaches out_dir.
    parts = {"train": (TRAIN_FILE, drawn.train)}
    if val_shots:
        parts["val"] = (VAL_FILE, drawn.val)
    manifests: dict[str, bytes] = {}
    manifest_records: dict[str, dict[str, Any]] = {}
    for key, (name, chosen) in parts.items():
        manifests[name] = canonical_manifest_bytes(chosen)
        manifest_records[key] = {"file": name, "sha256": sha256_bytes(manifests[name]), "entries": len(chosen)}

    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "dataset": adapter.name,
        "split": split,
        "root": storage.uri,
        "shots": shots,
        "seed": seed,
        "val_shots": val_shots,
        "subset": subset,
        "warnings": name_warnings,
        "counts": {
            "classes": len(classes),
            "images": len(entries),
            "read": draw.report.files_checked,
            "skipped_broken": skipped,
            "train": len(drawn.train),
            "val": len(drawn.val),
        },
        "manifests": manifest_records,
        "classes_file": CLASSES_FILE,
        "templates_file": TEMPLATES_FILE,
        "train_templates_file": TRAIN_TEMPLATES_FILE,
        "saft_version": __version__,
    }
    files: dict[str, bytes | list[str] | dict[str, Any]] = dict(manifests)
    files[CLASSES_FILE] = list(classes)
    files[TEMPLATES_FILE] = list(prompt_templates)
    files[TRAIN_TEMPLATES_FILE] = list(training_templates)
    files[RECORD_FILE] = record
    _commit(out, files)
    log.info("prepared %s (%s, split %s): %d classes, %d train / %d val images -> %s", storage.uri,
             adapter.name, split, len(classes), len(drawn.train), len(drawn.val), out)
    return PrepareResult(
        out_dir=out,
        classes=tuple(classes),
        templates=prompt_templates,
        train_count=len(drawn.train),
        val_count=len(drawn.val),
        skipped=skipped,
        train_hash=manifest_records["train"]["sha256"],
        val_hash=manifest_records["val"]["sha256"] if "val" in manifest_records else None,
        record=record,
    )


__all__ = [
    "DEFAULT_TEMPLATES",
    "PrepareError",
    "PrepareResult",
    "SUBSETS",
    "SUPPORTED_DATASETS",
    "TemplateError",
    "check_dataset",
    "check_split",
    "check_template",
    "load_templates",
    "prepare_dataset",
    "trainable_adapter",
]
