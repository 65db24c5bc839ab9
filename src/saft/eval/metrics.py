"""Evaluation records and their aggregates (the metrics JSON).

Schema (``METRICS_SCHEMA`` below is the version tag written into every file):

* ``records``: one object per model x dataset x seed x alpha::

      {"model": "saft", "seed": 1, "alpha": 1.0, "dataset": "imagenet-v2",
       "role": "ood", "top1": 0.61, "n": 10000}

  ``role`` is ``id`` or ``ood`` (domain shift / cross-dataset suites) or ``base`` /
  ``new`` (base-to-new). ``seed`` and ``alpha`` may be null (zero-shot has neither).
* ``aggregates``: one object per model x alpha, averaged over seeds::

      {"model": "saft", "alpha": 1.0, "seeds": [1, 2, 3],
       "per_dataset": {"imagenet": {"role": "id", "mean": .., "std": .., "n_seeds": 3}},
       "id": {"mean": .., "std": ..}, "ood_mean": {"mean": .., "std": ..},
       "base": .., "new": .., "hm": ..,                       # when base/new roles exist
       "id_gain": .., "ood_gain": .., "effective_robustness": ..}  # when a zero-shot model exists

  ``id``/``ood_mean`` are first averaged over datasets within a seed, then mean and
  sample standard deviation are taken over seeds. ``hm`` is the harmonic mean of base
  and new accuracy. Against the model named ``zeroshot``: ``id_gain`` and ``ood_gain``
  are differences of the means, and ``effective_robustness`` is the OOD gain in excess
  of what the ID gain alone would give on the zero-shot ID/OOD line
  (``ood_gain - id_gain * zs_ood / zs_id``), so a model that only moves along the
  zero-shot line scores 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Iterable

METRICS_SCHEMA = "saft-metrics/1"
ROLES = ("id", "ood", "base", "new")
ZERO_SHOT = "zeroshot"


@dataclass(frozen=True)
class Record:
    model: str
    dataset: str
    role: str
    top1: float
    n: int
    seed: int | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"record for {self.dataset!r}: role must be one of {ROLES}, got {self.role!r}")
        if not 0.0 <= self.top1 <= 1.0:
            raise ValueError(f"record for {self.dataset!r}: top1 must be a fraction in [0, 1], got {self.top1}")

    def to_dict(self) -> dict:
        return asdict(self)


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return {"mean": math.nan, "std": math.nan}
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var)}


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _per_seed_role_means(records: list[Record]) -> dict[str, dict[object, float]]:
    """role -> seed -> mean top-1 over that role's datasets."""
    by = defaultdict(lambda: defaultdict(list))
    for r in records:
        by[r.role][r.seed].append(r.top1)
    return {role: {seed: sum(v) / len(v) for seed, v in seeds.items()} for role, seeds in by.items()}


def aggregate(records: Iterable[Record]) -> list[dict]:
    """Aggregate records per (model, alpha); see the module docstring for the fields."""
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.model, r.alpha)].append(r)
    out = []
    for (model, alpha), recs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] is None, kv[0][1] or 0)):
        per_dataset = {}
        for name in sorted({r.dataset for r in recs}):
            rows = [r for r in recs if r.dataset == name]
            per_dataset[name] = {"role": rows[0].role, **mean_std([r.top1 for r in rows]), "n_seeds": len(rows)}
        role_means = _per_seed_role_means(recs)
        agg = {"model": model, "alpha": alpha, "seeds": sorted({r.seed for r in recs if r.seed is not None}),
               "per_dataset": per_dataset}
        if "id" in role_means:
            agg["id"] = mean_std(list(role_means["id"].values()))
        if "ood" in role_means:
            agg["ood_mean"] = mean_std(list(role_means["ood"].values()))
        if "base" in role_means and "new" in role_means:
            seeds = sorted(set(role_means["base"]) & set(role_means["new"]), key=str)
            agg["base"] = mean_std([role_means["base"][s] for s in seeds])
            agg["new"] = mean_std([role_means["new"][s] for s in seeds])
            agg["hm"] = mean_std([harmonic_mean(role_means["base"][s], role_means["new"][s]) for s in seeds])
        out.append(agg)
    _add_gains(out)
    return out


def _add_gains(aggregates: list[dict]) -> None:
    zs = next((a for a in aggregates if a["model"] == ZERO_SHOT), None)
    if zs is None or "id" not in zs or "ood_mean" not in zs:
        return
    zs_id, zs_ood = zs["id"]["mean"], zs["ood_mean"]["mean"]
    for a in aggregates:
        if "id" in a and "ood_mean" in a:
            a["id_gain"] = a["id"]["mean"] - zs_id
            a["ood_gain"] = a["ood_mean"]["mean"] - zs_ood
            slope = zs_ood / zs_id if zs_id else 0.0
            a["effective_robustness"] = a["ood_gain"] - a["id_gain"] * slope


def metrics_document(records: Iterable[Record], meta: dict | None = None) -> dict:
    records = list(records)
    return {"schema": METRICS_SCHEMA, "meta": dict(meta or {}), "records": [r.to_dict() for r in records],
            "aggregates": aggregate(records)}


def records_from_document(doc: dict) -> list[Record]:
    if doc.get("schema") != METRICS_SCHEMA:
        raise ValueError(f"not a metrics document of schema {METRICS_SCHEMA!r} (found {doc.get('schema')!r})")
    return [Record(**r) for r in doc["records"]]
