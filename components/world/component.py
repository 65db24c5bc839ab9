"""The embedded world (default data), or a marker that the data lives at ``data_root``."""

from kfp.dsl import Dataset, Output


def world(data_root: str, pool_per_class: int, test_per_class: int, world: Output[Dataset]):
    from saft.steps.tasks import world_task

    world_task(world.path, data_root, pool_per_class, test_per_class)
