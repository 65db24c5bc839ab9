"""Fan-in of one seed's trained methods, inside the benchmark's loop over seeds."""

from typing import List

from kfp.dsl import Dataset, Input, Model, Output


def gather_seed(trained: Input[List[Model]], data: Input[Dataset], deltas: Output[Model]):
    """Copies one seed's method outputs and its prepared data into one folder.

    The methods of a seed are a loop inside the loop over seeds; KFP gathers a nested loop's
    outputs one level at a time, so each seed gathers its own here and gather-deltas merges
    the seeds.

    Args:
        trained: The train-method outputs of the seed, one per method.
        data: The seed's prepare output.
        deltas: <method>-seed<N>/ for each method (with wiseft/ beside full's when chosen), data-seed<N>/.
    """
    from saft.orchestration.tasks import gather_deltas as gather

    gather([t.path for t in trained], deltas.path, data_dirs=[data.path])
