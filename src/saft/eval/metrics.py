"""Evaluation records and their aggregates (the metrics JSON).

Schema ``saft-metrics/2`` (``METRICS_SCHEMA``; ``saft-metrics/1`` documents are still read):

* ``records``: one object per model x dataset x seed x alpha::

      {"model": "saft", "seed": 1, "alpha": 1.0, "dataset": "imagenet-v2",
       "role": "ood", "top1": 0.61, "n": 10000, "group": null}

  ``role`` is ``id`` or ``ood`` (domain-shift and cross-dataset suites), ``base`` / ``new``
  (base-to-new: ``group`` names the dataset both halves belong to) or ``id_subset`` (ID
  accuracy on the classes of the shift named by ``group``, the x-axis of that shift's
  effective-robustness fit; in no mean). ``seed`` and ``alpha`` may be null (zero-shot
  has neither).
* ``aggregates``: one object per model x alpha; every statistic is ``{"mean", "std"}``,
  and ``std`` is null where there is no spread (one seed, or a harmonic mean of means)::

      {"model": "saft", "alpha": 1.0, "seeds": [1, 2, 3],
       "per_dataset": {"imagenet": {"role": "id", "group": null, "mean": .., "std": .., "n_seeds": 3}},
       "id": {..}, "ood_mean": {..},                          # when id / ood roles exist
       "base": {..}, "new": {..}, "hm": {..},                  # when base / new roles exist
       "base_to_new": {"pets": {"base": {..}, "new": {..}, "hm": {..}}},
       "id_gain": .., "ood_gain": ..,                          # against the zeroshot model
       "effective_robustness": {..}, "effective_robustness_per_shift": {"imagenet-v2": {..}}}

* ``definitions``: for every aggregate field present, one line saying how it is computed
  (the same lines the report prints).
* ``meta``: suite, model, base fingerprint, and under ``effective_robustness_reference``
  the reference fit used (:mod:`saft.eval.robustness`), when there is one.

Effective robustness is reported only against a reference fit (the published testbed for
ImageNet's shifts, or one the user supplies); a suite without one (the embedded world, a
user suite) gets the plain gains against zero-shot and nothing under that name.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Iterable

from saft.eval.robustness import Reference

METRICS_SCHEMA = "saft-metrics/2"
READABLE_SCHEMAS = ("saft-metrics/1", METRICS_SCHEMA)
ROLES = ("id", "ood", "base", "new", "id_subset")
GROUPED_ROLES = ("base", "new", "id_subset")
ZERO_SHOT = "zeroshot"
REFERENCE_META = "effective_robustness_reference"

DEFINITIONS = {
    "per_dataset": "top-1 of each dataset: mean over seeds; std is the sample standard deviation over seeds "
                   "(none with one seed)",
    "id": "mean top-1 over the ID datasets within each seed, then mean and sample std over seeds",
    "ood_mean": "mean top-1 over the OOD datasets within each seed, then mean and sample std over seeds",
    "base": "mean base-class top-1 over the datasets within each seed (each half scored with a head over its own "
            "classes), then mean and sample std over seeds",
    "new": "mean new-class top-1 over the datasets within each seed (each half scored with a head over its own "
           "classes), then mean and sample std over seeds",
    "hm": "harmonic mean of the mean base and the mean new accuracy (CoCoOp, Zhou et al. 2022): "
          "2 * base * new / (base + new) of the means above; no spread",
    "base_to_new": "per dataset: base and new top-1 as mean and sample std over seeds, HM of the two means",
    "id_gain": "ID mean minus the zero-shot model's ID mean",
    "ood_gain": "OOD mean minus the zero-shot model's OOD mean",
    "effective_robustness_per_shift": "per shift and seed: OOD top-1 minus the top-1 the reference fit predicts "
                                      "from ID top-1 (a line in {transform} space over {reference}; Taori et al. "
                                      "2020), then mean and sample std over seeds",
    "effective_robustness": "per seed, the mean of the per-shift effective robustness over {shifts}, then mean "
                            "and sample std over seeds",
}


@dataclass(frozen=True)
class Record:
    model: str
    dataset: str
    role: str
    top1: float
    n: int
    seed: int | None = None
    alpha: float | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"record for {self.dataset!r}: role must be one of {ROLES}, got {self.role!r}")
        if not 0.0 <= self.top1 <= 1.0:
            raise ValueError(f"record for {self.dataset!r}: top1 must be a fraction in [0, 1], got {self.top1}")
        if self.role in GROUPED_ROLES and not self.group:
            raise ValueError(f"record for {self.dataset!r}: role {self.role!r} needs a group (the dataset its "
                             "halves belong to, or the shift whose classes it covers)")

    def to_dict(self) -> dict:
        return asdict(self)


def stat(values: list[float]) -> dict:
    """Mean and sample standard deviation; the std is None for fewer than two values."""
    if not values:
        return {"mean": math.nan, "std": None}
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, "std": None}
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))}


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _per_seed_means(records: list[Record], role: str) -> dict[object, float]:
    """seed -> mean top-1 over that role's datasets in that seed."""
    by: dict[object, list[float]] = defaultdict(list)
    for r in records:
        if r.role == role:
            by[r.seed].append(r.top1)
    return {seed: sum(v) / len(v) for seed, v in by.items()}


def _base_to_new(recs: list[Record]) -> tuple[dict, dict]:
    """(base/new/hm over datasets, per-dataset base/new/hm): CoCoOp's HM of the means."""
    base, new = _per_seed_means(recs, "base"), _per_seed_means(recs, "new")
    seeds = [s for s in base if s in new]
    overall = {"base": stat([base[s] for s in seeds]), "new": stat([new[s] for s in seeds])}
    overall["hm"] = {"mean": harmonic_mean(overall["base"]["mean"], overall["new"]["mean"]), "std": None}
    per_group = {}
    for group in sorted({r.group for r in recs if r.role in ("base", "new")}):
        halves = {role: stat([r.top1 for r in recs if r.group == group and r.role == role]) for role in ("base", "new")}
        halves["hm"] = {"mean": harmonic_mean(halves["base"]["mean"], halves["new"]["mean"]), "std": None}
        per_group[group] = halves
    return overall, per_group


def _effective_robustness(recs: list[Record], reference: Reference) -> tuple[dict, dict]:
    """(average over shifts, per shift), each a stat over seeds; empty when no shift has a fit."""
    ids = _per_seed_means(recs, "id")
    subset_x = {(r.group, r.seed): r.top1 for r in recs if r.role == "id_subset"}
    per_shift: dict[str, dict[object, float]] = {}
    for r in recs:
        if r.role != "ood" or r.dataset not in reference.fits or r.seed not in ids:
            continue
        fit = reference.fits[r.dataset]
        x = ids[r.seed] if fit.x == "id" else subset_x.get((r.dataset, r.seed))
        if x is not None:
            per_shift.setdefault(r.dataset, {})[r.seed] = reference.effective_robustness(r.dataset, x, r.top1)
    if not per_shift:
        return {}, {}
    shifts = sorted(per_shift)
    seeds = [s for s in ids if all(s in per_shift[sh] for sh in shifts)]
    average = stat([sum(per_shift[sh][s] for sh in shifts) / len(shifts) for s in seeds])
    return average, {sh: stat(list(per_shift[sh].values())) for sh in shifts}


def aggregate(records: Iterable[Record], reference: Reference | None = None) -> list[dict]:
    """Aggregate records per (model, alpha); see the module docstring for the fields."""
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.model, r.alpha)].append(r)
    out = []
    for (model, alpha), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] is None, kv[0][1] or 0)):
        per_dataset = {}
        for name in sorted({r.dataset for r in recs}):
            rows = [r for r in recs if r.dataset == name]
            per_dataset[name] = {"role": rows[0].role, "group": rows[0].group, **stat([r.top1 for r in rows]),
                                 "n_seeds": len(rows)}
        agg = {"model": model, "alpha": alpha, "seeds": sorted({r.seed for r in recs if r.seed is not None}),
               "per_dataset": per_dataset}
        roles = {r.role for r in recs}
        for role, key in (("id", "id"), ("ood", "ood_mean")):
            if role in roles:
                agg[key] = stat(list(_per_seed_means(recs, role).values()))
        if {"base", "new"} <= roles:
            overall, per_group = _base_to_new(recs)
            agg.update(overall, base_to_new=per_group)
        if reference is not None and "id" in roles:
            average, per_shift = _effective_robustness(recs, reference)
            if per_shift:
                agg["effective_robustness"] = average
                agg["effective_robustness_per_shift"] = per_shift
        out.append(agg)
    _add_gains(out)
    return out


def _add_gains(aggregates: list[dict]) -> None:
    zs = next((a for a in aggregates if a["model"] == ZERO_SHOT), None)
    if zs is None:
        return
    for a in aggregates:
        for gain, key in (("id_gain", "id"), ("ood_gain", "ood_mean")):
            if key in a and key in zs:
                a[gain] = a[key]["mean"] - zs[key]["mean"]


def definitions(aggregates: list[dict], reference: Reference | None = None) -> dict[str, str]:
    """One line per aggregate field present: how it was computed."""
    present = {key for a in aggregates for key in a} | {"per_dataset"}
    shifts = sorted({s for a in aggregates for s in a.get("effective_robustness_per_shift", {})})
    out = {}
    for key, text in DEFINITIONS.items():
        if key in present:
            if reference is not None:
                text = text.format(transform=reference.transform, reference=f"the reference {reference.name!r}",
                                   shifts=", ".join(shifts))
            out[key] = text
    if reference is not None:
        out.update(_not_reported(aggregates, reference, set(shifts)))
    return out


def _not_reported(aggregates: list[dict], reference: Reference, reported: set[str]) -> dict[str, str]:
    """Why an OOD dataset of the document has no effective robustness (one line)."""
    ood = sorted({d for a in aggregates for d, v in a["per_dataset"].items() if v["role"] == "ood"} - reported)
    reasons = []
    for shift in ood:
        if shift in reference.missing:
            reasons.append(f"{shift}: {reference.missing[shift]}")
        elif shift in reference.fits:
            reasons.append(f"{shift}: its fit's x-axis is ID top-1 on the shift's classes, and the suite has no "
                           f"id_subset entry with group {shift!r}")
        else:
            reasons.append(f"{shift}: no fit in the reference {reference.name!r}")
    return {"effective_robustness_missing": "; ".join(reasons)} if reasons else {}


def metrics_document(records: Iterable[Record], meta: dict | None = None,
                     reference: Reference | None = None) -> dict:
    records = list(records)
    meta = dict(meta or {})
    if reference is None and meta.get(REFERENCE_META):
        reference = Reference.from_dict(meta[REFERENCE_META])
    if reference is not None:
        meta[REFERENCE_META] = reference.to_dict()
    aggregates = aggregate(records, reference)
    return {"schema": METRICS_SCHEMA, "meta": meta, "definitions": definitions(aggregates, reference),
            "records": [r.to_dict() for r in records], "aggregates": aggregates}


def _legacy_group(row: dict) -> dict:
    """A saft-metrics/1 record had no group: its base/new halves were ``<dataset>/base`` and ``/new``."""
    if row.get("role") in ("base", "new") and not row.get("group"):
        name = str(row["dataset"])
        row = {**row, "group": name.rsplit("/", 1)[0] if name.endswith(("/base", "/new")) else name}
    return row


def records_from_document(doc: dict) -> list[Record]:
    if doc.get("schema") not in READABLE_SCHEMAS:
        raise ValueError(f"not a metrics document of schema {METRICS_SCHEMA!r} (found {doc.get('schema')!r})")
    return [Record(**_legacy_group(r)) for r in doc["records"]]

