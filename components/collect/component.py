"""Merge the evaluation parts: metrics, report, results table, KFP metrics for the UI."""

from typing import List, NamedTuple

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def collect(parts: Input[List[Artifact]], deltas: Input[Model], tracking: bool, results: Output[Dataset],
            report: Output[HTML], table: Output[Markdown],
            headline: Output[Metrics]) -> NamedTuple("Outputs", [("checks_passed", str)]):
    """Merges the per-dataset metrics into one metrics.json, the report and the results table.

    On the embedded world it also computes the world's validity checks.

    Args:
        parts: The evaluate tasks' outputs.
        deltas: The evaluated deltas (sizes and learning rates for the table).
        tracking: Log a nested MLflow run.
        results: metrics.json, results.json, results.md, report.html and plots.
        report: The HTML report.
        table: The results table.
        headline: ID / OOD mean (and HM) per model, as KFP metrics.

    Returns:
        checks_passed: true, false, or n/a off the embedded world.
    """
    from saft.orchestration.publish import publish_collect
    from saft.orchestration.parent_run import parent_run

    return publish_collect([p.path for p in parts], [deltas.path], parent_run(tracking), results, report, table,
                           headline)
