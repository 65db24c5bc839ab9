"""Fan-in of the benchmark's trained deltas into one artifact."""

from typing import List

from kfp.dsl import Input, Model, Output


def gather_deltas(seeds: Input[List[Model]], deltas: Output[Model]):
    """Merges the seeds' gathered folders into one (one sub-folder per method and seed).

    KFP cannot hand a collection gathered in one loop to the tasks of another loop, so the
    evaluation fan-out and the register task read the deltas (and each seed's prepared
    class names, templates and data version) from this single folder.

    Args:
        seeds: The gather-seed outputs, one per seed.
        deltas: <method>-seed<N>/ for each delta (with wiseft/ beside full's when chosen), data-seed<N>/ for each seed's prepared files.
    """
    from saft.orchestration.tasks import gather_deltas as gather

    gather([s.path for s in seeds], deltas.path)
