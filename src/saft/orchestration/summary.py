"""A finished cluster run, in Markdown: what CI writes to its job summary and pull request.

Every pipeline run's parent MLflow run is tagged with the KFP run id and, by the
finish-run task (never cached), holds the results table (``results/results.md``) and the
registry decision (``results/register.json``); the data-version task tagged it with the
data version. This module reads them back with nothing but the run id and the MLflow
credentials.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def _artifact(client, run_id: str, path: str) -> str | None:
    with tempfile.TemporaryDirectory(prefix="saft-summary-") as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # absent artifact: MLflow raises store-specific errors
            return None
        return Path(local).read_text(encoding="utf-8")


def run_summary(kfp_run_id: str, state: str, *, pipeline: str, revision: str = "") -> str:
    """Results table and registry decision of KFP run ``kfp_run_id`` (read from MLflow)."""
    title = f"## saft {pipeline}: run `{kfp_run_id}` {state.lower()}"
    lines = [title, ""]
    if revision:
        lines += [f"Data revision: `{revision}`", ""]
    try:
        from saft.orchestration.parent_run import find_parent_run
        from saft.tracking.config import make_client, resolve_config

        parent = find_parent_run(kfp_run_id)
        client = make_client(resolve_config())
    except Exception as exc:  # noqa: BLE001 - the summary reports what it could not read
        return "\n".join(lines + [f"No MLflow record of this run: {exc}", ""])
    tags = client.get_run(parent).data.tags
    if "saft.data_version" in tags:
        lines += [f"Data version: `{tags['saft.data_version']}` ({tags.get('saft.data_kind', '?')}: "
                  f"{tags.get('saft.data_root', '?')} at {tags.get('saft.data_rev', '?')}); MLflow run `{parent}`", ""]
    table = _artifact(client, parent, "results/results.md")
    lines += ["```", table.rstrip() if table else "(no results table: the run stopped before collect)", "```", ""]
    decision = _artifact(client, parent, "results/register.json")
    if decision:
        doc = json.loads(decision)
        lines += [f"**Registry: {doc.get('verdict')}** - {doc.get('summary', '')}", ""]
    else:
        lines += ["**Registry: no decision** (registration off, or the run stopped before register)", ""]
    return "\n".join(lines)


__all__ = ["run_summary"]
