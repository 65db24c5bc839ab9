"""The world's validity checks: does the embedded world show the failure mode SAFT addresses?

Computed from zero-shot and full fine-tuning only, never from SAFT's numbers, on the
``synthshift`` suite's aggregates (``saft.eval.metrics``). The thresholds are the world's
definition of "full fine-tuning gains ID but loses OOD"; they are never tuned toward SAFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Checks:
    zero_shot_id: float
    full_id_gain: float
    full_ood_gain: float
    results: dict = field(default_factory=dict)

    @classmethod
    def compute(cls, aggregates: list[dict]) -> "Checks":
        by = {(a["model"], a["alpha"]): a for a in aggregates}
        zs = by[("zeroshot", None)]
        full = next(a for (m, al), a in by.items() if m == "full" and al in (1.0, None))
        zs_id, zs_ood = zs["id"]["mean"], zs["ood_mean"]["mean"]
        c = cls(zs_id, full["id"]["mean"] - zs_id, full["ood_mean"]["mean"] - zs_ood)
        c.results = {
            "zero-shot ID accuracy within [30%, 85%]": 0.30 <= zs_id <= 0.85,
            "full fine-tuning gains >= 5 ID points over zero-shot": c.full_id_gain >= 0.05,
            "full fine-tuning loses OOD (or gains < 1/3 of its ID gain)":
                c.full_ood_gain < 0 or c.full_ood_gain < c.full_id_gain / 3,
            "every OOD set above chance (+5 points) zero-shot": all(
                v["mean"] > 0.15 for v in zs["per_dataset"].values() if v["role"] == "ood"),
        }
        return c

    @property
    def passed(self) -> bool:
        return all(self.results.values())
