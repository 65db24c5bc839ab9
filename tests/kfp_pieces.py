"""Small pipelines made of the real components, for tests that need only a piece of one.

Kept apart from the test modules: those use ``from __future__ import annotations``, and kfp
reads a pipeline function's parameter annotations as types, not strings.
"""

from kfp import dsl

from saft.orchestration.cluster import ClusterConfig, configure
from saft.orchestration.repository import load_components


def data_pipeline():
    """data-version -> world -> prepare with the retrain pipeline's components and parameter names.

    Parameters as in the retrain pipeline (not constants), so each task's arguments, and with
    them kfp.local's cache keys, are what the retrain pipeline's same tasks get.
    """
    cfg, c = ClusterConfig(kubernetes=False), load_components(ClusterConfig().image)

    @dsl.pipeline(name="saft-retrain-data")
    def data_only(data_root: str, data_rev: str, data_repo: str, data_version: str, pool_per_class: int,
                  test_per_class: int, dataset: str, split: str, shots: int, val_shots: int, seed: int,
                  tracking: bool, train_templates: list, templates: list, skip_corrupt: bool, data_subset: str):
        version = configure(c.data_version(data_root=data_root, data_rev=data_rev, data_repo=data_repo,
                                           expected=data_version, pool_per_class=pool_per_class,
                                           test_per_class=test_per_class, tracking=tracking), "data_version", cfg)
        world = configure(c.world(data_root=data_root, data_version=version.output, pool_per_class=pool_per_class,
                                  test_per_class=test_per_class), "world", cfg)
        configure(c.prepare(world=world.outputs["world"], data_root=data_root, dataset=dataset, split=split,
                            shots=shots, val_shots=val_shots, seed=seed, data_rev=data_rev, data_repo=data_repo,
                            tracking=tracking, train_templates=train_templates, templates=templates,
                            skip_corrupt=skip_corrupt, subset=data_subset), "prepare", cfg)

    return data_only
