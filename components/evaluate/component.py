"""The evaluation fan-out: the suite's dataset names, then one task per dataset."""

from kfp.dsl import Artifact, Dataset, Input, Model, Output


def suite_datasets(world: Input[Dataset], suite: str, data_root: str) -> list:
    from saft.steps.tasks import suite_datasets as names

    return names(world.path, suite, data_root)


def evaluate(model: str, world: Input[Dataset], suite: str, data_root: str, dataset: str, alphas: list,
             batch_size: int, device: str, run: Input[Artifact], deltas: Input[Model], metrics: Output[Artifact]):
    from saft.steps.tasks import evaluate_task, parent_run

    evaluate_task(model, world.path, suite, data_root, dataset, deltas.path, metrics.path, alphas=alphas,
                  batch_size=batch_size, device=device, parent_run_id=parent_run(run.path))
