"""Open and close the pipeline's parent MLflow run; every step gets its id through the ``run`` artifact.

The id travels as a small artifact rather than a string output because kfp.local
replaces string outputs that enter a ParallelFor with the loop item.
"""

from kfp.dsl import Artifact, Dataset, Input, Output


def start_run(params_json: str, run_name: str, tracking: bool, run: Output[Artifact]):
    import json

    from saft.steps.tasks import start_task

    start_task(json.loads(params_json), run_name, tracking, run.path)


def finish_run(run: Input[Artifact], results: Input[Dataset]):
    # results is not read: as an input it makes the run end only after collect
    from saft.steps.tasks import finish_task, parent_run

    finish_task(parent_run(run.path))
