"""Turning nested configs and metrics documents into MLflow's flat names.

MLflow accepts metric and param names of letters, digits, ``_ - . / :`` and spaces;
anything else (``@`` in a model spec, for one) becomes ``_`` so a log call never fails
on a name.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value
_INVALID = re.compile(r"[^\w\-./: ]")


def clean_name(name: str) -> str:
    return _INVALID.sub("_", str(name)).strip() or "_"


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": {"c": 1}}}`` -> ``{"a.b.c": "1"}``; lists become JSON text."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        if isinstance(value, (list, tuple, Mapping)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        if len(text) > PARAM_VALUE_LIMIT:
            text = text[: PARAM_VALUE_LIMIT - 3] + "..."
        flat[clean_name(name)] = text
    return flat


def numeric(value: Any) -> float | None:
    """A loggable metric value, or None for anything that is not a number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:  # numpy and torch scalars
        return float(value)
    except (TypeError, ValueError):
        return None


def model_prefix(model: str, alpha: float | None) -> str:
    """Metric prefix of one aggregate: ``saft`` at alpha 1 (or none), else ``saft.alpha_0.5``."""
    if alpha is None or alpha == 1.0:
        return clean_name(model)
    return clean_name(f"{model}.alpha_{alpha:g}")


def metrics_from_document(doc: Mapping[str, Any]) -> dict[str, float]:
    """Per-dataset top-1 and aggregate metrics of a saft-metrics document.

    Names: ``<model>.<dataset>`` (mean top-1 over seeds), ``<model>.id``,
    ``<model>.ood_mean``, ``<model>.base|new|hm``, ``<model>.<dataset>.hm`` (base-to-new
    per dataset), ``<model>.effective_robustness`` and ``.effective_robustness.<shift>``
    (only against a reference fit), the ``_std`` of each where there is a spread (none
    with one seed), and ``<model>.id_gain``, ``.ood_gain`` against zero-shot.
    """
    out: dict[str, float] = {}

    def put(name: str, stat: Mapping[str, Any]) -> None:
        out[name] = float(stat["mean"])
        if stat.get("std") is not None:
            out[f"{name}_std"] = float(stat["std"])

    for agg in doc.get("aggregates", []):
        prefix = model_prefix(agg["model"], agg.get("alpha"))
        for dataset, row in agg.get("per_dataset", {}).items():
            out[f"{prefix}.{clean_name(dataset)}"] = float(row["mean"])
        for key in ("id", "ood_mean", "base", "new", "hm", "effective_robustness"):
            if key in agg:
                put(f"{prefix}.{key}", agg[key])
        for group, halves in agg.get("base_to_new", {}).items():
            out[f"{prefix}.{clean_name(group)}.hm"] = float(halves["hm"]["mean"])
        for shift, stat in agg.get("effective_robustness_per_shift", {}).items():
            put(f"{prefix}.effective_robustness.{clean_name(shift)}", stat)
        for key in ("id_gain", "ood_gain"):
            if key in agg:
                out[f"{prefix}.{key}"] = float(agg[key])
    return out
