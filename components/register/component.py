"""Register the SAFT delta in MLflow and apply the OOD-aware promotion gate."""

from typing import List

from kfp.dsl import Artifact, Dataset, Input, Model, Output


def register(model: str, results: Input[Dataset], deltas: Input[Model], data: Input[List[Dataset]],
             model_name: str, promote: bool, ood_tolerance: float, id_tolerance: float, baseline: bool,
             run: Input[Artifact], decision: Output[Artifact]):
    from saft.steps.tasks import parent_run, register_task

    register_task(model, results.path, deltas.path, [d.path for d in data], decision.path,
                  method="saft", model_name=model_name, promote=promote, ood_tolerance=ood_tolerance,
                  id_tolerance=id_tolerance, baseline=baseline, parent_run_id=parent_run(run.path))
