"""Few-shot manifests for one seed, read from one data version."""

from kfp.dsl import Dataset, Input, Output


def prepare(world: Input[Dataset], data_root: str, dataset: str, split: str, shots: int, val_shots: int, seed: int,
            data_rev: str, data_repo: str, tracking: bool, data: Output[Dataset], train_templates: list = [],
            subset: str = "all", version_check: bool = True, templates: list = [], skip_corrupt: bool = False) -> str:
    """Validates the training split and draws the few-shot train and ID validation manifests.

    The root is read at the data version the world output records, or not at all (resolved
    again and compared). Data read through DVC at a revision is copied into the output
    (only the drawn images).

    Args:
        world: The world task's output: the data version, and the default pool when data_root is empty.
        data_root: Training data root (folder or s3://bucket/prefix); "" = the world's pool.
        dataset: Dataset adapter (see `saft data adapters`), e.g. imagefolder, imagenet.
        split: Split to draw from ("" = the dataset's training split).
        shots: Training images per class.
        val_shots: ID validation images per class (drawn apart from the training shots).
        seed: Seed of the draw.
        data_rev: Git revision of a DVC-tracked data_root.
        data_repo: Repository of a DVC-tracked data_root.
        tracking: Log a nested MLflow run.
        data: train.jsonl, val.jsonl, classes.json, templates.json, prepare.json, data_version.json.
        train_templates: Prompts of scoring and training, each with one '{}' for the class name; empty = the dataset's own.
        subset: all, or base (the first half of the classes in label order: the base-to-new protocol).
        templates: Evaluation prompt templates, each with one '{}' for the class name; empty = the dataset's own.
        skip_corrupt: Replace broken drawn images with the next images of their classes instead of failing.
        version_check: False: read data_root as it is, without the world's data version (a base-to-new training on one dataset's own suite root, which the run's version does not cover).

    Returns:
        The training manifest's sha256.
    """
    from saft.data.prepare import PrepareConfig
    from saft.orchestration.parent_run import parent_run
    from saft.orchestration.tasks import prepare_task

    cfg = PrepareConfig(dataset=dataset, split=split, shots=shots, val_shots=val_shots, seed=seed, subset=subset,
                        templates=list(templates), train_templates=list(train_templates), skip_corrupt=skip_corrupt)
    return prepare_task(world.path, data.path, cfg, data_root=data_root, data_rev=data_rev, data_repo=data_repo,
                        parent_run_id=parent_run(tracking), data_version=None if version_check else "")
