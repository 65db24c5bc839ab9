"""The collect step: evaluation parts (one per dataset when fanned out) -> one result.

Merges the metrics documents of the evaluate step's parts into one ``metrics.json``
(records concatenated, aggregates recomputed over all of them with the parts' shared
effective-robustness reference), writes the report (with the run context: settings, the
deltas' sizes, mask landing and training curves), and a ``results.json`` /
``results.md`` with the results table: ID, each OOD set, OOD mean (or base, new and HM
on a base-to-new suite), trainable values and delta size per method. On the embedded
world's ``synthshift`` suite it also computes the world's validity checks from
zero-shot and full fine-tuning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from saft.eval.alpha_curve import ood_at_matched_id
from saft.eval.metrics import REFERENCE_META, metrics_document, records_from_document
from saft.eval.report import write_report
from saft.io import atomic_path, write_json
from saft.steps.configs import WISEFT
from saft.steps.report_context import report_context
from saft.steps.evaluate import METRICS_FILE, DeltaRun
from saft.world.checks import Checks
from saft.world.table import format_checks, format_results
from saft.layout import EVAL

RESULTS_FILE = EVAL.results
TABLE_FILE = EVAL.table
WORLD_SUITE = "synthshift"


def merge_metrics(docs: Iterable[dict]) -> dict:
    docs = list(docs)
    if not docs:
        raise ValueError("collect: no metrics documents to merge")
    meta = dict(docs[0].get("meta", {}))
    for doc in docs[1:]:
        for key in ("suite", "model", "base_fingerprint", REFERENCE_META):
            if doc.get("meta", {}).get(key) != meta.get(key):
                raise ValueError(f"collect: the parts disagree on {key} ({meta.get(key)!r} vs "
                                 f"{doc.get('meta', {}).get(key)!r}); evaluate them with one model and suite")
    records = [r for doc in docs for r in records_from_document(doc)]
    seen = set()
    for r in records:
        key = (r.model, r.dataset, r.seed, r.alpha)
        if key in seen:
            raise ValueError(f"collect: {r.dataset} for {r.model} (seed {r.seed}, alpha {r.alpha}) appears twice")
        seen.add(key)
    return metrics_document(records, meta)


def delta_sizes(runs: Iterable[dict]) -> dict[str, dict]:
    """Trainable values and delta file size per method (its first run: every seed trains as many)."""
    sizes: dict[str, dict] = {}
    for run in runs:
        sizes.setdefault(run["method"], {"trainable": run["trainable"], "delta_bytes": run["delta_bytes"]})
    return sizes


def collect_step(metric_files: list[str | Path], out_dir: str | Path, *, deltas: Iterable[DeltaRun] = (),
                 learning_rates: dict | None = None, settings: dict | None = None) -> dict:
    """Write ``metrics.json``, the report, ``results.json`` and ``results.md`` into ``out_dir``.

    ``settings`` (key -> value) are shown in the report's run table beside what the delta
    files themselves record.
    """
    deltas = list(deltas)
    docs = []
    for path in metric_files:
        path = Path(path) / METRICS_FILE if Path(path).is_dir() else Path(path)
        try:
            docs.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"collect: cannot read the metrics part {path}: {exc}") from exc
    doc = merge_metrics(docs)
    out = Path(out_dir)
    write_json(out / METRICS_FILE, doc)
    context = report_context(deltas, settings)
    write_report(doc, out, title=f"{doc['meta'].get('suite', 'suite')}: {doc['meta'].get('model', '')}",
                 context=context)
    summary = {"suite": doc["meta"].get("suite"), "model": doc["meta"].get("model"),
               "aggregates": doc["aggregates"], "sizes": delta_sizes(context["runs"]),
               "learning_rates": dict(learning_rates or {}), "ood_at_matched_id": {},
               "definitions": doc["definitions"]}
    wiseft = sorted((d.seed, d.alpha) for d in deltas if d.alpha is not None and d.name == WISEFT)
    if wiseft:
        summary["wiseft_alpha"] = {str(seed): alpha for seed, alpha in wiseft}
    if any(a["alpha"] not in (None, 0.0, 1.0) for a in doc["aggregates"]):
        # Read off measured alpha curves; with alpha 1 alone it would be a straight-line guess.
        matched = ood_at_matched_id(doc["aggregates"])
        if wiseft and "full" in matched:  # WiSE-FT's points lie on full fine-tuning's curve: they share its value
            matched[WISEFT] = matched["full"]
        summary["ood_at_matched_id"] = matched
    models = {a["model"] for a in doc["aggregates"]}
    if summary["suite"] == WORLD_SUITE and {"zeroshot", "full"} <= models:
        checks = Checks.compute(doc["aggregates"])
        summary.update(checks=checks.results, checks_passed=checks.passed)
    write_json(out / RESULTS_FILE, summary)
    with atomic_path(out / TABLE_FILE) as tmp:
        tmp.write_text(results_text(summary) + "\n")
    return summary


def results_text(summary: dict) -> str:
    """The table (and, on the world, the validity verdict) as printed at the end of a run."""
    lines = [format_results(summary)]
    if summary.get("learning_rates"):
        lines.append("learning rates: " + ", ".join(
            f"{m} {'/'.join(f'{x:g}' for x in lr) + ' (per seed)' if isinstance(lr, list) else f'{lr:g}'}"
            for m, lr in sorted(summary["learning_rates"].items())))
    if summary.get("wiseft_alpha"):
        lines.append("wiseft alpha (chosen on ID validation): " + ", ".join(
            f"seed {s} {a:g}" for s, a in summary["wiseft_alpha"].items()))
    if "checks" in summary:
        lines += ["", format_checks(summary)]
    return "\n".join(lines)
