"""A step's MLflow run, or a stand-in that logs nothing when the pipeline is untracked.

The parent run id travels explicitly (a string, empty when untracked) so steps in other
processes, pods or DVC stages attach their nested runs to the right pipeline run.
"""

from __future__ import annotations

from contextlib import nullcontext
from saft.layout import EVAL, FINETUNE, MASK, PREPARED, STEP_RECORD


class NoTracking:
    """Accepts every tracker call and does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def step_context(step: str, parent_run_id: str | None, params: dict | None = None):
    """``with step_context(...) as tracker:`` a nested MLflow run under ``parent_run_id``."""
    if not parent_run_id:
        return nullcontext(NoTracking())
    from saft.tracking.runs import step_run

    return step_run(step, parent_run_id, params)


PARENT_ENV = "SAFT_PARENT_RUN_ID"


def log_outputs(tracker, out_dir) -> None:
    """Log what a step left in ``out_dir``: mask statistics, curves, metrics, report, mask, delta."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    readers = {MASK.stats: tracker.log_mask_stats, FINETUNE.history: tracker.log_history,
               EVAL.metrics: tracker.log_metrics_document}
    for name, log in readers.items():
        if (out / name).is_file():
            log(json.loads((out / name).read_text()))
    if (out / EVAL.report_html).is_file():
        tracker.log_report(str(out))
    for name in (MASK.mask, FINETUNE.delta, EVAL.results, PREPARED.record, STEP_RECORD):
        if (out / name).is_file():
            tracker.log_artifact(str(out / name))


def command_context(command: str, args: dict):
    """A nested run for a CLI step when a pipeline runner (e.g. ``saft repro`` around
    ``dvc repro``) exported its parent run id in ``SAFT_PARENT_RUN_ID``; else nothing."""
    import os

    return step_context(command, os.environ.get(PARENT_ENV, ""), args)
