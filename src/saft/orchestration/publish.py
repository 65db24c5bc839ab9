"""The collect task's outputs in the shapes the KFP UI shows: HTML, Markdown, Metrics."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path
from saft.layout import EVAL

HEADLINE_KEYS = (("id", "id"), ("ood_mean", "ood_mean"), ("hm", "hm"))


def headline_metrics(summary: dict) -> dict[str, float]:
    """``<model>_<id|ood_mean|hm>`` at alpha 1 (or zero-shot), as fractions; on a base-to-new suite also
    ``<model>_<dataset>_hm`` per dataset."""
    out = {}
    for agg in summary["aggregates"]:
        if agg["alpha"] not in (None, 1.0):
            continue
        for key, label in HEADLINE_KEYS:
            if key in agg:
                out[f"{agg['model']}_{label}"] = round(agg[key]["mean"], 6)
        for group, halves in sorted(agg.get("base_to_new", {}).items()):
            if halves.get("hm") is not None:
                out[f"{agg['model']}_{group}_hm"] = round(halves["hm"]["mean"], 6)
    return out


def publish_collect(part_dirs, deltas_dirs, parent_run_id, results, report, table, headline, step="collect"):
    """Merge ``part_dirs`` (evaluate outputs, or earlier results) into ``results``; fill the UI artifacts."""
    from saft.steps.collect import TABLE_FILE
    from saft.orchestration.eval_tasks import collect_task

    summary = collect_task(part_dirs, deltas_dirs, results.path, parent_run_id=parent_run_id, step=step)
    shutil.copyfile(Path(results.path) / EVAL.report_html, report.path)
    shutil.copyfile(Path(results.path) / TABLE_FILE, table.path)
    values = headline_metrics(summary)
    for name, value in values.items():
        headline.log_metric(name, value)
    # KFP keeps Metrics in the artifact's metadata; a file at its path too, because kfp.local
    # treats a cached artifact without a file as gone and would never serve this task from cache.
    Path(headline.path).parent.mkdir(parents=True, exist_ok=True)
    Path(headline.path).write_text(json.dumps(values, sort_keys=True, indent=2) + "\n")
    passed = summary.get("checks_passed")
    return namedtuple("Outputs", ["checks_passed"])("n/a" if passed is None else str(bool(passed)).lower())
