"""The world step: render (or reuse) the embedded world, the default data of every run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from saft.layout import WORLD_B2N_SUITE, WORLD_SUITE
from saft.steps.params import WorldParams
from saft.world.spec import get_world, world_fingerprint
from saft.world.task import build_world

POOL_DIR = get_world().pool_dir  # the default version's, which the pipelines render
WORLD_SUITES = ("", "synthshift", "synthshift-b2n")  # evaluate.suite values that name the world's own suites


def world_suite(suite: str, subset: str = "all") -> str | None:
    """The world's suite file that ``evaluate.suite`` names (``""``: synthshift, or synthshift-b2n when the
    training subset is ``base``); None when ``suite`` names something else."""
    if suite not in WORLD_SUITES:
        return None
    return WORLD_B2N_SUITE if suite == "synthshift-b2n" or (not suite and subset == "base") else WORLD_SUITE


def world_step(out_dir: str | Path, params: WorldParams | None = None, *, version: str | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Render world ``version`` (default: the default version) into ``out_dir`` (existing images are kept)."""
    params, world = params or WorldParams(), get_world(version)
    root = build_world(out_dir, pool_per_class=params.pool_per_class, test_per_class=params.test_per_class,
                       version=world.name, log=log)
    return {"root": str(root), "version": world.name, "train_root": str(root / world.pool_dir),
            "suite": str(root / WORLD_SUITE), "b2n_suite": str(root / WORLD_B2N_SUITE)}


def world_fingerprint_status(version: str | None = None, model: str = "tiny") -> dict:
    """The version's fingerprint with ``model`` now, against the frozen one (``matches`` None if not frozen)."""
    from saft.models import load_model

    world = get_world(version)
    now = world_fingerprint(world, load_model(model).fingerprint)
    frozen = world.frozen
    if not frozen:
        return {"fingerprint": now, "matches": None,
                "text": f"{world.name}: {now} (not frozen: no fingerprint recorded in saft/world/records.json)"}
    ok = frozen["fingerprint"] == now
    text = (f"{world.name}: {now}\n" + (f"matches the fingerprint frozen on {frozen['date']}" if ok else
            f"DIFFERS from the fingerprint frozen on {frozen['date']} ({frozen['fingerprint']}): the renderer, "
            "the image library or the model changed, so results are not comparable with the frozen world's"))
    return {"fingerprint": now, "matches": ok, "text": text}
