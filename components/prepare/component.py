"""Few-shot manifests for one seed; the manifest hash keys downstream caches."""

from kfp.dsl import Artifact, Dataset, Input, Output


def prepare(world: Input[Dataset], data_root: str, dataset: str, split: str, shots: int, val_shots: int, seed: int,
            run: Input[Artifact], data: Output[Dataset]) -> str:
    from saft.steps.tasks import parent_run, prepare_task

    return prepare_task(world.path, data.path, data_root=data_root, dataset=dataset, split=split, shots=shots,
                        val_shots=val_shots, seed=seed, parent_run_id=parent_run(run.path))
