"""Fan-in of one loop's finetune outputs into one artifact."""

from typing import List

from kfp.dsl import Input, Model, Output


def gather_runs(runs: Input[List[Model]], deltas: Output[Model]):
    """Copies finetune outputs into one folder (one <method>-seed<N>/ sub-folder each).

    Args:
        runs: Finetune outputs.
        deltas: <method>-seed<N>/ for each input.
    """
    from saft.orchestration.tasks import gather_deltas

    gather_deltas([r.path for r in runs], deltas.path)
