"""The evaluation suite's dataset names: the items of the evaluation fan-out."""

from kfp.dsl import Dataset, Input


def suite_datasets(world: Input[Dataset], suite: str, data_root: str, subset: str = "all") -> list:
    """Lists the datasets of the suite (a built-in name, a suite YAML, or the world's synthshift).

    Args:
        world: The world task's output (its suite when suite is empty).
        suite: Built-in suite name or suite YAML file; "" = the embedded world's synthshift.
        data_root: Root the suite's datasets live under.
        subset: The training subset (base: an empty suite is the world's synthshift-b2n).

    Returns:
        The dataset names.
    """
    from saft.orchestration.eval_tasks import suite_datasets as names

    return names(world.path, suite, data_root, subset)
