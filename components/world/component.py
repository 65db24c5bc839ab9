"""The data source: the embedded world (the default data), or a marker that the data lives at ``data_root``."""

from kfp.dsl import Dataset, Output


def world(data_root: str, data_version: str, pool_per_class: int, test_per_class: int, world: Output[Dataset]):
    """Renders the embedded world (shape classes in six domains, deterministic), unless data_root is set.

    Either way the output records the data version: every task that reads data takes this
    output (or one made from it), so the version is part of every such task's cache key.

    Args:
        data_root: Non-empty: the data lives there; the output only records that.
        data_version: The version the data_version task resolved.
        pool_per_class: Training pool images per class.
        test_per_class: Test images per class and domain.
        world: The rendered world (pool, test sets, suite file) or the marker; data_version.json.
    """
    from saft.orchestration.tasks import world_task

    world_task(world.path, data_root, pool_per_class, test_per_class, data_version=data_version)
