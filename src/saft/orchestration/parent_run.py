"""Which MLflow parent run a Kubeflow task belongs to, without touching its cache key.

The tasks of one pipeline run log nested MLflow runs under one parent run. Handing the
parent's id to the tasks as an input would make it part of every cache key: a new id on
every run, so no task could ever be served from cache. The identity of the pipeline run
travels instead in the environment, which KFP leaves out of cache keys:

- on a cluster, ``SAFT_PIPELINE_RUN`` is the pod's ``pipeline/runid`` label (the KFP run
  id, set through kfp-kubernetes ``use_field_path_as_env``);
- under kfp.local, ``saft pipeline run --local`` sets it for the task subprocesses.

The ``start-run`` task creates the parent run tagged ``saft.pipeline_run=<that id>``;
every other task looks the parent up by that tag. ``SAFT_PARENT_RUN_ID``, when set (as
``saft repro`` does for DVC stages), names the parent directly.
"""

from __future__ import annotations

import os

from saft.steps.tracked import PARENT_ENV

PIPELINE_RUN_ENV = "SAFT_PIPELINE_RUN"
PIPELINE_RUN_TAG = "saft.pipeline_run"
_found: dict[str, str] = {}


def pipeline_run_id() -> str:
    run = os.environ.get(PIPELINE_RUN_ENV, "")
    if not run:
        raise RuntimeError(f"{PIPELINE_RUN_ENV} is not set: this task does not know which pipeline run it belongs "
                           "to (the compiled pipeline sets it from the pod's pipeline/runid label; "
                           "`saft pipeline run --local` sets it for its tasks)")
    return run


def open_parent_run(name: str, params: dict, tags: dict | None = None) -> str:
    """Create the parent run of this pipeline run (tagged with its id); returns the MLflow run id."""
    from saft.tracking.runs import start_pipeline_run

    run = pipeline_run_id()
    parent = start_pipeline_run(name, params, {PIPELINE_RUN_TAG: run, **(tags or {})})
    _found[run] = parent
    return parent


def parent_run(tracking: bool) -> str:
    """The parent MLflow run id of this task's pipeline run; "" when tracking is off."""
    from saft.tracking.config import tracking_enabled

    if not tracking or not tracking_enabled():
        return ""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    run = pipeline_run_id()
    if run not in _found:
        _found[run] = find_parent_run(run)
    return _found[run]


def find_parent_run(run: str) -> str:
    from saft.tracking.config import get_or_create_experiment, make_client, probe, resolve_config, tracking_call
    from saft.tracking.runs import DEFAULT_EXPERIMENT

    config = resolve_config()
    probe(config)
    client = make_client(config)
    with tracking_call(config, f"looking up the parent run of pipeline run {run}"):
        experiment = get_or_create_experiment(client, config, DEFAULT_EXPERIMENT)
        found = client.search_runs([experiment], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{run}'",
                                   max_results=2)
    if not found:
        raise RuntimeError(f"no MLflow parent run tagged {PIPELINE_RUN_TAG}={run} on {config.display}: the start-run "
                           "task creates it; check that every task reaches the same MLFLOW_TRACKING_URI")
    return found[0].info.run_id


__all__ = ["PIPELINE_RUN_ENV", "PIPELINE_RUN_TAG", "find_parent_run", "open_parent_run", "parent_run",
           "pipeline_run_id"]
