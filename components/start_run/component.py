"""Open the pipeline run's parent MLflow run."""


def start_run(params_json: str, run_name: str, tracking: bool) -> str:
    """Opens the parent MLflow run of this pipeline run; the other tasks nest their runs under it.

    The parent is tagged with the pipeline run's id (environment variable
    SAFT_PIPELINE_RUN, the pod's pipeline/runid label), and every task finds it by that
    tag, so no task takes a per-run input that would keep it from being cached.

    Args:
        params_json: The resolved params.yaml as JSON, logged as the run's parameters.
        run_name: Name of the MLflow run.
        tracking: False: no MLflow run (and no registration downstream).

    Returns:
        The MLflow run id ("" when untracked).
    """
    import json

    from saft.orchestration.tasks import start_task

    return start_task(json.loads(params_json), run_name, tracking)
