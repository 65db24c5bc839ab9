"""Merge the base-to-new parts: base, new and HM per dataset and averaged, the report and the table."""

from typing import List, NamedTuple

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def collect_base2new(parts: Input[List[Artifact]], deltas: Input[List[Model]], tracking: bool,
                     results: Output[Dataset], report: Output[HTML], table: Output[Markdown],
                     headline: Output[Metrics]) -> NamedTuple("Outputs", [("checks_passed", str)]):
    """Merges each dataset's evaluation (its own deltas on its own base and new halves) into one document.

    The metrics hold base, new and their harmonic mean per dataset (base_to_new) and the
    HM of the averaged base and new accuracies, as the CoOp/CoCoOp protocol reports them.

    Args:
        parts: The evaluate tasks' outputs, one per dataset.
        deltas: The finetune outputs, one per dataset.
        tracking: Log a nested MLflow run.
        results: metrics.json, results.json, results.md, report.html and plots.
        report: The HTML report.
        table: The results table.
        headline: Base, new and HM per model, as KFP metrics.

    Returns:
        checks_passed: n/a (the world's validity checks need its ID/OOD suite).
    """
    from saft.orchestration.publish import publish_collect
    from saft.orchestration.parent_run import parent_run

    return publish_collect([p.path for p in parts], [d.path for d in deltas], parent_run(tracking), results, report,
                           table, headline)
