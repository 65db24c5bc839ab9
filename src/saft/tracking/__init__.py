"""MLflow tracking for the pipeline: runs, the model registry, the promotion gate, serving.

Only this package (and ``saft.steps.register``) imports mlflow, and only inside the
functions that need it: ``import saft.tracking`` stays cheap. See docs/tracking.md.

    from saft.tracking import start_pipeline_run, step_run, end_pipeline_run
"""

from __future__ import annotations

from saft.serving import bases as _bases
from saft.tracking.config import (TrackingError, TrackingUnavailable, download_from_store, resolve_config,
                                  tracking_enabled)
from saft.tracking.runs import (
    TRACKING_OFF_RUN_ID,
    NullTracker,
    StepTracker,
    end_pipeline_run,
    pipeline_run,
    start_pipeline_run,
    step_run,
)

_bases.MLFLOW_DOWNLOAD = download_from_store  # bases sits below tracking: it is told how to reach the store

__all__ = [
    "TRACKING_OFF_RUN_ID", "NullTracker", "StepTracker", "TrackingError", "TrackingUnavailable",
    "end_pipeline_run", "pipeline_run", "resolve_config", "start_pipeline_run", "step_run", "tracking_enabled",
]
