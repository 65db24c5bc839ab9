"""Close the parent MLflow run, with the results table and the registry decision on it."""

from kfp.dsl import Artifact, Dataset, Input


def finish_run(tracking: bool, results: Input[Dataset], decision: Input[Artifact] = None):
    """Logs the results (table, report, selection) and the registry decision on the parent run, then ends it.

    Never cached: it runs in every pipeline run, so the parent run holds the results even
    when collect was served from cache.

    Args:
        tracking: False: nothing to do.
        results: The collect task's results folder.
        decision: The register task's decision folder (absent when registration is off).
    """
    from saft.orchestration.tasks import finish_task

    finish_task(tracking, results_dir=results.path, decision_dir=decision.path if decision is not None else None)
