"""Merge the evaluation parts: metrics, report, results table, KFP metrics for the UI."""

from typing import List, NamedTuple

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def collect(parts: Input[List[Artifact]], deltas: Input[Model], lr_saft: float, lr_full: float, lr_random: float,
            run: Input[Artifact], results: Output[Dataset], report: Output[HTML], table: Output[Markdown],
            headline: Output[Metrics]) -> NamedTuple("Outputs", [("checks_passed", str)]):
    from saft.orchestration.publish import publish_collect

    return publish_collect([p.path for p in parts], deltas.path, {"saft": lr_saft, "full": lr_full, "random": lr_random},
                           run.path, results, report, table, headline)
