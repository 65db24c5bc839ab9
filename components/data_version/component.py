"""The version of the training data now: the key every data-reading task's cache follows."""


def data_version(data_root: str, data_rev: str, data_repo: str, expected: str, pool_per_class: int,
                 test_per_class: int, tracking: bool) -> str:
    """Resolves the data's version at run time (never cache this task).

    DVC-tracked folder: DVC's content hash at git revision data_rev (dvc.api); plain
    s3://bucket/prefix: a hash of the object listing with ETags; local folder: a hash of
    its file listing (path, size, mtime); embedded world: a hash of its parameters. The
    version is recorded as MLflow lineage on the parent run.

    Args:
        data_root: Training data root (folder, s3://bucket/prefix, or "" for the embedded world).
        data_rev: Git revision of a DVC-tracked data_root ("" = the working tree).
        data_repo: Repository of the DVC-tracked data_root (path or git URL; "" = the one it is in).
        expected: Non-empty: fail unless the data is exactly this version.
        pool_per_class: Embedded world only: images per class of its training pool.
        test_per_class: Embedded world only: test images per class and domain.
        tracking: Record the version on the parent MLflow run.

    Returns:
        The version, e.g. dvc-3c8dc2c4..., s3-9f1e...
    """
    from saft.orchestration.tasks import data_version_task

    return data_version_task(data_root, rev=data_rev, repo=data_repo, expected=expected,
                             pool_per_class=pool_per_class, test_per_class=test_per_class, tracking=tracking)
