"""The base-to-new fan-out: one training per dataset of the suite."""

from kfp.dsl import Dataset, Input


def base2new_trainings(world: Input[Dataset], suite: str, eval_data_root: str, dataset: str, data_root: str) -> list:
    """Lists the trainings of a base-to-new suite, one per dataset (each trained on its base half).

    Args:
        world: The world task's output (its synthshift-b2n when suite is empty).
        suite: A base-to-new suite (base2new, a YAML file); "" = the world's synthshift-b2n.
        eval_data_root: Root the suite's datasets live under.
        dataset: Training dataset adapter for a suite of one dataset (the world's).
        data_root: Training data root for a suite of one dataset ("" = the world's pool).

    Returns:
        Items with group (the dataset, which evaluate scores on both halves), dataset and root to prepare from, version_check.
    """
    from saft.orchestration.eval_tasks import base2new_fanout

    return base2new_fanout(world.path, suite, eval_data_root, dataset=dataset, data_root=data_root)
