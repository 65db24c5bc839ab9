"""The retrained candidate beside the optional baselines, in one table."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def compare(results: Input[Dataset], candidate: Input[Model], baseline_metrics: Input[Artifact],
            baselines: Input[Model], tracking: bool, comparison: Output[Dataset], report: Output[HTML],
            table: Output[Markdown], headline: Output[Metrics]):
    """Merges the candidate's results with the baselines' evaluation (full fine-tuning, a random mask).

    Baselines are for comparison only: they are never registered.

    Args:
        results: The collect task's results (zero-shot and the candidate).
        candidate: The chosen candidate (select's output).
        baseline_metrics: The baselines' evaluation on the whole suite.
        baselines: The baselines' finetune outputs.
        tracking: Log a nested MLflow run.
        comparison: metrics.json, results.json, results.md, report.html with every model.
        report: The HTML report.
        table: The results table.
        headline: ID / OOD mean per model, as KFP metrics.
    """
    from saft.orchestration.publish import publish_collect
    from saft.orchestration.parent_run import parent_run

    publish_collect([results.path, baseline_metrics.path], [candidate.path, baselines.path], parent_run(tracking),
                    comparison, report, table, headline, step="compare")
