"""The evaluate step: model spec (+ deltas at alphas) x suite -> metrics JSON and report.

Each model variant is the base (``zeroshot``) or base + alpha * delta (a delta given its
own alpha, WiSE-FT's chosen point, at that alpha only; a delta with a trained head adds
alpha times its class offsets to the head, :meth:`saft.sparse.delta.Delta.head_offsets`);
every variant is scored on every suite entry with a zero-shot head built from the entry's class names and
templates (cached on disk per weights/classes/templates). Labels that live in a larger
class space (ImageNet-A/-R, and ``id_subset`` entries on their classes) are scored with
logits restricted to their classes. A base or new half is scored with a head over its
own classes only (labels renumbered within the half), the split rule of
:func:`saft.data.fewshot.split_base_new` that ``prepare --subset base`` trains on.
Effective robustness needs a reference fit (``EvaluateConfig.reference``, default the
suite's own); its fitted lines are stored in the metrics document.

Each suite entry's images are decoded once for all variants: a batch is read (by loader
workers), and every variant's weights are merged in turn to score it. Deltas are read
and checked against the base's fingerprint once, before any image is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from saft.data.adapters import get_adapter
from saft.data.fewshot import split_base_new
from saft.data.images import ImageDecodeError, load_rgb
from saft.data.storage import open_storage
from saft.eval.head import cached_head
from saft.eval.metrics import ZERO_SHOT, Record, metrics_document
from saft.eval.report import write_report
from saft.eval.robustness import NO_REFERENCE, Reference, load_reference
from saft.eval.runner import Variant, evaluate_variants
from saft.eval.suites import Suite, SuiteEntry
from saft.io import write_json
from saft.models import load_model
from saft.config import to_mapping
from saft.sparse import FingerprintMismatch, apply_delta, load_delta, remove_delta
from saft.sparse.distributed import SINGLE, Dist, from_env
from saft.steps.configs import DeltaRun, EvaluateConfig
from saft.steps.record import run_once
from saft.layout import EVAL, FINETUNE, PREPARED

METRICS_FILE = EVAL.metrics


class TrainingImageInEvaluation(ValueError):
    """An evaluation image is also an image a delta was trained (or its rate chosen) on."""


class EntryImages(Dataset):
    """(transform(image), label) for indexed entries of a storage root, streamed.

    ``trained`` maps the sha256 of every image a delta was trained or validated on to that
    delta: an evaluation image among them is refused (its accuracy would be measured on
    training data) unless the check is off.
    """

    def __init__(self, root: str, entries, transform: Callable, trained: dict[str, str] | None = None,
                 entry_name: str = ""):
        self.storage = open_storage(root)
        self.entries = list(entries)
        self.transform = transform
        self.trained, self.entry_name = trained or {}, entry_name

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        entry = self.entries[i]
        uri = self.storage.uri_for(entry.path)
        with self.storage.open(entry.path) as fh:
            data = fh.read()
        if self.trained:
            digest = hashlib.sha256(data).hexdigest()
            if digest in self.trained:
                raise TrainingImageInEvaluation(
                    f"{uri}: this {self.entry_name} evaluation image is also a training image of "
                    f"{self.trained[digest]} (same sha256 {digest[:12]}): its accuracy would count images it was "
                    "trained on. Evaluate on a split disjoint from the training data, or pass "
                    "--allow-train-overlap to score it anyway (the metrics then record that it was not checked)")
        try:  # the same decoding as training (CMYK, 16-bit, alpha, EXIF rotation handled)
            image = load_rgb(io.BytesIO(data), uri)
        except ImageDecodeError as err:
            raise ImageDecodeError(f"{err}; check the file or validate the root with `saft data validate`") from err
        return self.transform(image), entry.label


def trained_images(run: DeltaRun, log: Callable[[str], None] = print) -> dict[str, str]:
    """sha256 -> delta of the images ``run``'s delta was trained or validated on, from its prepared data.

    The data folder is the one its finetune record names, else a ``data-seed<N>/`` beside a gathered
    delta holding the same training manifest; when neither is here the check cannot run and says so.
    """
    from saft.data.manifest import read_manifest
    from saft.steps.prepared import PreparedData

    folder = Path(run.path).parent
    record = folder / FINETUNE.record
    if not record.is_file():
        log(f"evaluate: WARNING: {run.path} has no {FINETUNE.record} beside it: its training images cannot be "
            "told apart from the evaluation images")
        return {}
    doc = json.loads(record.read_text())
    candidates = [Path(doc["data"])] if doc.get("data") else []
    candidates += sorted(folder.parent.glob("data-seed*"))
    label = f"{run.name}" + ("" if run.seed is None else f" seed {run.seed}")
    for data in candidates:
        if not (data / PREPARED.record).is_file():
            continue
        prepared = PreparedData.open(data)
        if doc.get("manifest_hash") and prepared.manifest_hash("train") != doc["manifest_hash"]:
            continue
        out = {}
        for part in ("train", "val"):
            path = data / (PREPARED.train if part == "train" else PREPARED.val)
            if path.is_file():
                out.update({e.sha256: f"{label} ({part})" for e in read_manifest(path)})
        return out
    log(f"evaluate: WARNING: the prepared data {run.path} was trained on is not here ({doc.get('data')}): its "
        "training images cannot be told apart from the evaluation images")
    return {}


@dataclass
class _Task:
    entry: SuiteEntry
    classes: list[str]
    templates: list[str]
    images: list
    subset: list[int] | None

    def record(self, model: str, seed: int | None, alpha: float | None, acc) -> Record:
        e = self.entry
        return Record(model, e.name, e.role, acc.top1, acc.n, seed, alpha, e.group)


def _task(entry: SuiteEntry, template_set: str, suite: Suite | None = None) -> _Task:
    adapter = get_adapter(entry.dataset)
    if template_set != "default" and template_set in adapter.template_sets:
        adapter = adapter.with_templates(template_set)
    split = entry.split or ("test" if "test" in adapter.splits else adapter.default_split)
    index = adapter.scan(entry.root, split)
    classes = adapter.class_names(entry.root)
    subset = adapter.imagenet_subset
    entries = list(index.entries)
    if entry.role in ("base", "new"):
        # a head over the half's own classes: labels renumbered within the half
        half = split_base_new(range(len(classes)))[0 if entry.role == "base" else 1]
        position = {label: i for i, label in enumerate(half)}
        entries = [dataclasses.replace(e, label=position[e.label]) for e in entries if e.label in position]
        classes, subset = [classes[i] for i in half], None
    elif entry.role == "id_subset":
        shift = get_adapter(suite.entry(entry.group).dataset) if suite is not None else None
        subset = shift.imagenet_subset if shift is not None else None
        if not subset:
            raise ValueError(f"suite entry {entry.name!r}: role id_subset needs its group {entry.group!r} to be a "
                             "dataset covering a subset of the ID classes (ImageNet-A/-R)")
        kept = set(subset)
        entries = [e for e in entries if e.label in kept]
    if not entries:
        raise ValueError(f"suite entry {entry.name!r}: no images found under {entry.root} (split {split!r})")
    return _Task(entry, classes, adapter.templates, entries, subset)


def resolve_reference(cfg: EvaluateConfig, suite: Suite) -> Reference | None:
    """The effective-robustness reference: the config's, else the suite's default; None for none."""
    name = cfg.reference or suite.reference
    if not name or name == NO_REFERENCE or "ood" not in suite.roles or "id" not in suite.roles:
        return None
    return load_reference(name)


def select_entries(suite: Suite, names: list[str]) -> list[SuiteEntry]:
    if not names:
        return list(suite.entries)
    known = [e.name for e in suite.entries]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"suite {suite.name!r} has no dataset {', '.join(map(repr, unknown))}; "
                         f"its datasets: {', '.join(known)}")
    return [e for e in suite.entries if e.name in names]


def evaluate_suite(cfg: EvaluateConfig, suite: Suite, out_dir: str | Path, *, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict:
    """Score every variant on every entry; write metrics.json and the report into ``out_dir``.

    Returns the metrics document. Skipped when ``out_dir`` already holds the metrics of
    the same configuration, suite and delta files (see :mod:`saft.steps.record`).
    """
    reference = resolve_reference(cfg, suite)  # a bad reference file fails before any model is loaded
    params = {"config": to_mapping(cfg, skip=("suite", "data_root")), "suite": asdict(suite),
              "reference": None if reference is None else reference.to_dict()}
    outputs = [METRICS_FILE] + ([] if cfg.only else [EVAL.report_md, EVAL.report_html])

    dist, device = from_env(cfg.device)  # under torchrun: this rank's share of every dataset's batches

    def compute() -> dict:
        _evaluate(cfg, suite, out_dir, progress, log if dist.is_main else (lambda _: None), reference, dist,
                  device)
        return {}  # the document itself stays in metrics.json

    run_once("evaluate", out_dir, params, [Path(run.path) for run in cfg.deltas], outputs, compute, log=log, dist=dist)
    return json.loads((Path(out_dir) / METRICS_FILE).read_text())


def _checked_delta(run: DeltaRun, loaded, device: str):
    """The delta of ``run``, on ``device``, refused unless trained on this base."""
    delta = load_delta(run.path)
    if delta.base_fingerprint != loaded.fingerprint:
        raise FingerprintMismatch(
            f"{run.path}: delta was trained on {delta.meta.get('base_model', 'another base')} (fingerprint "
            f"{delta.base_fingerprint[:12]}...) but the model {loaded.spec} has fingerprint {loaded.fingerprint[:12]}...; "
            "evaluate it with its own base model"
        )
    return delta.to(device)


def _merged(model, delta, alpha: float):
    """A context factory merging ``alpha * delta`` into ``model`` for a block, restoring the base bit for bit."""
    @contextlib.contextmanager
    def merged():
        apply_delta(model, delta, alpha, check_fingerprint=False)  # checked once in _checked_delta
        try:
            yield
        finally:
            remove_delta(model, delta)
    return merged


def _evaluate(cfg: EvaluateConfig, suite: Suite, out_dir: str | Path, progress: bool,
              log: Callable[[str], None], reference: Reference | None = None, dist: Dist = SINGLE,
              device: str | None = None) -> dict:
    device = device or cfg.device
    entries = select_entries(suite, cfg.only)
    loaded = load_model(cfg.model, device=device)
    model = loaded.model
    tasks = [_task(e, cfg.template_set, suite) for e in entries]
    # (name, seed, recorded alpha, run, applied alpha): a run with its own alpha (WiSE-FT's chosen point) is one
    # point, recorded without an alpha like the base
    variants: list[tuple[str, int | None, float | None, DeltaRun | None, float]] = []
    if cfg.zeroshot:
        variants.append((ZERO_SHOT, None, None, None, 0.0))
    for run in cfg.deltas:
        if run.alpha is not None:
            variants.append((run.name, run.seed, None, run, run.alpha))
        else:
            variants += [(run.name, run.seed, alpha, run, alpha) for alpha in cfg.alphas]
    if not variants:
        raise ValueError("nothing to evaluate: pass --delta NAME=PATH or keep the zero-shot model")
    deltas = {run.path: _checked_delta(run, loaded, device) for run in cfg.deltas}
    trained: dict[str, str] = {}
    unchecked: list[str] = []  # deltas whose training images are not here: the record must not say "checked"
    if not cfg.allow_train_overlap:  # a delta scored on its own training images would be scored too high
        for run in cfg.deltas:
            images = trained_images(run, log=log)
            trained.update(images)
            if not images:
                unchecked.append(run.path)
    loader = cfg.loader
    records = []
    for task in tasks:
        scored = []
        for name, seed, alpha, run, weight in variants:
            merged = _merged(model, deltas[run.path], weight) if run is not None else contextlib.nullcontext
            key = loaded.fingerprint
            if run is not None and weight != 0:
                key = hashlib.sha256(f"{loaded.fingerprint}|{Path(run.path).resolve()}|"
                                     f"{Path(run.path).stat().st_mtime_ns}|{weight}".encode()).hexdigest()
            with merged():
                head = cached_head(model, loaded.tokenizer, task.classes, task.templates, fingerprint=key,
                                   device=device, progress=progress and dist.is_main)
            offsets = deltas[run.path].head_offsets(task.classes, weight) if run is not None else None
            if offsets is not None:  # a trained head (lpft): its classes' offsets, zero for classes it never saw
                head = head + offsets.to(device=head.device, dtype=head.dtype)
            shown = alpha if run is None or run.alpha is None else weight
            label = f"{name}{'' if seed is None else f':{seed}'}{'' if shown is None else f'@{shown:g}'}"
            scored.append(Variant(head, merged, label))
        data = EntryImages(task.entry.root, task.images, loaded.preprocess, trained, task.entry.name)
        accs = evaluate_variants(model, scored, data, subset=task.subset, batch_size=cfg.batch_size, loader=loader,
                                 device=device, progress=progress,
                                 desc=f"{task.entry.name} ({len(scored)} variant{'s' * (len(scored) > 1)})", dist=dist)
        for (name, seed, alpha, _, _), variant, acc in zip(variants, scored, accs):
            records.append(task.record(name, seed, alpha, acc))
            log(f"{variant.label:<20} {task.entry.name:<24} {task.entry.role:<5} top-1 {100 * acc.top1:6.2f}  "
                f"(n={acc.n})")
    meta = {"suite": suite.name, "model": cfg.model, "base_fingerprint": loaded.fingerprint,
            "train_overlap": "not checked (--allow-train-overlap)" if cfg.allow_train_overlap else
            f"not checked for {len(unchecked)} delta(s) whose training data is not here: {', '.join(unchecked)}"
            if unchecked else
            f"checked: no evaluation image is one of the {len(trained)} images the deltas were trained or "
            "validated on"}
    doc = metrics_document(records, meta, reference)
    out = Path(out_dir)
    if dist.is_main:
        write_json(out / METRICS_FILE, doc)
        if not cfg.only:  # a fan-out part gets its report from the collect step
            from saft.steps.report_context import report_context

            write_report(doc, out, title=f"{suite.name}: {cfg.model}", context=report_context(cfg.deltas))
    return doc
