"""The embedded world's versions: which domains play ID and OOD, how they are rendered, the task.

A version is data: once frozen (``records.json``: its fingerprint and the date, recorded
before any SAFT or random-mask run on it), it does not change; a different world is a new
version. ``synthshift-v1`` stays reachable for the record (its ID domain, ``textile``, is
one pre-training never showed and its OOD sets are the pre-training domains: the
investigation in docs/synthshift-investigation.md shows why it cannot test SAFT's claim).

The fingerprint (:func:`world_fingerprint`) covers what the world *is*: a fixed sample of
rendered image bytes per domain and class (so a renderer or Pillow change shows), the task
settings, and the pre-trained model's own fingerprint; not the source text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from saft.data.synth import SHAPES, Sample, render
from saft.data.synth_v2 import render_collected

RECORDS_FILE = Path(__file__).with_name("records.json")
WORLD_SEED = 7  # pre-training renders with its own seed (0 for the shipped model): no pool or test image was seen


@dataclass(frozen=True)
class Task:
    """The protocol a version is measured with: the setting the benchmark defaults to (learning-rate
    grids are the protocol's own: saft.protocols.methods)."""
    shots: int = 16
    val_shots: int = 48  # pool 64 = 16 train + 48 validation: rates are chosen on 480 images, not 80
    pool_per_class: int = 64
    test_per_class: int = 100
    seeds: tuple[int, ...] = (1, 2, 3)
    steps: int = 100
    batch_size: int = 32
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # ID-OOD curves; 0.5 is validity check 5's point


@dataclass(frozen=True)
class World:
    name: str
    id_domain: str
    ood_domains: tuple[str, ...]
    render: Callable[[str, str, int, int], Sample]
    summary: str
    task: Task = Task()

    @property
    def pool_dir(self) -> str:
        """The ID pool under a world root, relative (few-shot train and validation are drawn from it)."""
        return f"{self.id_domain}/pool"

    @property
    def domains(self) -> tuple[str, ...]:
        return (self.id_domain,) + self.ood_domains

    def record(self) -> dict:
        return _records().get(self.name, {})

    @property
    def frozen(self) -> dict | None:
        """The frozen fingerprint and date, or None while the version is still being designed."""
        return self.record().get("frozen")


WORLDS = {
    "synthshift-v1": World(
        "synthshift-v1", "textile", ("photo", "photo_v2", "sketch", "cartoon", "clutter"), render,
        "ID textile (never pre-trained), OOD the pre-training domains: retired, cannot test the claim",
        Task(val_shots=8, alphas=(1.0,))),
    "synthshift-v2": World(
        "synthshift-v2", "photo", ("photo_v2", "sketch", "cartoon", "clutter"), render_collected,
        "collected world: ID photos through one camera (small objects, distractors, a class-colour cue), "
        "OOD a fresh sample and three renditions"),
}
DEFAULT_WORLD = "synthshift-v2"


class UnknownWorldError(ValueError):
    pass


def get_world(name: str | None = None) -> World:
    name = name or DEFAULT_WORLD
    if name not in WORLDS:
        raise UnknownWorldError(f"unknown world version {name!r}; versions: {', '.join(WORLDS)} "
                                f"(see `saft world --help`)")
    return WORLDS[name]


@lru_cache(maxsize=1)
def _records() -> dict:
    return json.loads(RECORDS_FILE.read_text()) if RECORDS_FILE.is_file() else {}


def world_fingerprint(world: World, model_fingerprint: str, per_class: int = 2) -> str:
    """sha256 over sample image bytes, the task and the model; what freezing a version pins."""
    h = hashlib.sha256()
    h.update(json.dumps({"name": world.name, "id": world.id_domain, "ood": list(world.ood_domains),
                         "task": asdict(world.task), "model": model_fingerprint}, sort_keys=True).encode())
    for domain in world.domains:
        for shape in SHAPES:
            for index in range(per_class):  # pool and test indices both
                for start in (0, 10_000):
                    h.update(np.asarray(world.render(domain, shape, start + index, WORLD_SEED).image).tobytes())
    return h.hexdigest()

