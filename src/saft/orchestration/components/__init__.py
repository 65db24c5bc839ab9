"""One lightweight kfp v2 component per pipeline task; each body is one call into ``saft.steps.tasks``.

The component functions are plain Python functions with kfp type annotations. Kubeflow
ships their source into the project image, so each imports what it needs inside its
body. ``build(image)`` turns them into components for one image tag (the image is a
compile-time choice in KFP v2, not a run-time parameter).
"""

from __future__ import annotations

from types import SimpleNamespace

from kfp import dsl

from saft.orchestration.components import (collect, evaluate, finetune, gather, prepare, register, score, tracking,
                                          world)

DEFAULT_IMAGE = "ghcr.io/saft-pipeline/saft:latest"

_FUNCTIONS = {
    "start_run": tracking.start_run,
    "finish_run": tracking.finish_run,
    "world": world.world,
    "prepare": prepare.prepare,
    "score": score.score,
    "finetune": finetune.finetune,
    "gather_deltas": gather.gather_deltas,
    "suite_datasets": evaluate.suite_datasets,
    "evaluate": evaluate.evaluate,
    "collect": collect.collect,
    "register": register.register,
}


def build(image: str = DEFAULT_IMAGE) -> SimpleNamespace:
    """Every component for ``image`` (kfp is preinstalled there, so it is not pip-installed at start)."""
    return SimpleNamespace(**{name: dsl.component(fn, base_image=image, install_kfp_package=False)
                              for name, fn in _FUNCTIONS.items()})
