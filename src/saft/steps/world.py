"""The world step: render (or reuse) the embedded world, the default data of every run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from saft.steps.params import WorldParams
from saft.world.task import ID_DOMAIN, build_world

SUITE_FILE = "synthshift.yaml"
B2N_SUITE_FILE = "synthshift-b2n.yaml"
POOL_DIR = f"{ID_DOMAIN}/pool"
WORLD_SUITES = ("", "synthshift", "synthshift-b2n")  # evaluate.suite values that name the world's own suites


def world_suite(suite: str, subset: str = "all") -> str | None:
    """The world's suite file that ``evaluate.suite`` names (``""``: synthshift, or synthshift-b2n when the
    training subset is ``base``); None when ``suite`` names something else."""
    if suite not in WORLD_SUITES:
        return None
    return B2N_SUITE_FILE if suite == "synthshift-b2n" or (not suite and subset == "base") else SUITE_FILE


def world_step(out_dir: str | Path, params: WorldParams | None = None, *, log: Callable[[str], None] = print) -> dict:
    """Render the world into ``out_dir`` (existing images are kept; rendering is deterministic)."""
    params = params or WorldParams()
    root = build_world(out_dir, pool_per_class=params.pool_per_class, test_per_class=params.test_per_class, log=log)
    return {"root": str(root), "train_root": str(root / POOL_DIR), "suite": str(root / SUITE_FILE),
            "b2n_suite": str(root / B2N_SUITE_FILE)}
