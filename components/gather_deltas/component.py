"""Fan-in of the trained deltas into one artifact.

KFP cannot hand a collection gathered from one loop to the tasks of another loop, so
the evaluation fan-out reads the deltas from this single folder (one sub-folder each).
"""

from typing import List

from kfp.dsl import Input, Model, Output


def gather_deltas(saft_deltas: Input[List[Model]], full_deltas: Input[List[Model]],
                  random_deltas: Input[List[Model]], deltas: Output[Model]):
    from saft.steps.tasks import gather_deltas as gather

    gather([d.path for d in list(saft_deltas) + list(full_deltas) + list(random_deltas)], deltas.path)
