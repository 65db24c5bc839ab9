"""Fan-in of the benchmark's trained deltas into one artifact."""

from typing import List

from kfp.dsl import Dataset, Input, Model, Output


def gather_deltas(saft_deltas: Input[List[Model]], full_deltas: Input[List[Model]],
                  random_deltas: Input[List[Model]], data: Input[List[Dataset]], deltas: Output[Model]):
    """Copies the finetune outputs of every method and seed into one folder (one sub-folder each).

    KFP cannot hand a collection gathered in one loop to the tasks of another loop, so the
    evaluation fan-out and the register task read the deltas (and each seed's prepared
    class names, templates and data version) from this single folder.

    Args:
        saft_deltas: SAFT finetune outputs, one per seed.
        full_deltas: Full fine-tuning outputs, one per seed.
        random_deltas: Random-mask outputs, one per seed.
        data: The prepare outputs, one per seed.
        deltas: <method>-seed<N>/ for each delta, data-seed<N>/ for each seed's prepared files.
    """
    from saft.orchestration.tasks import gather_deltas as gather

    gather([d.path for d in list(saft_deltas) + list(full_deltas) + list(random_deltas)], deltas.path,
           data_dirs=[d.path for d in data])
