"""A step's MLflow run, or a stand-in that logs nothing when the pipeline is untracked.

The parent run id travels explicitly (a string, empty when untracked) so steps in other
processes, pods or DVC stages attach their nested runs to the right pipeline run.
"""

from __future__ import annotations

from contextlib import nullcontext


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
