"""The embedded world on disk: the downstream task and the ``synthshift`` suite.

Layout under a world root (every tree an ImageFolder, so every adapter and suite applies)::

    textile/pool/<shape>/*.png    the downstream domain: few-shot train/val are drawn from here
    textile/test/<shape>/*.png    the ID test set (no shortcut: colour is independent of shape)
    <domain>/test/<shape>/*.png   OOD test sets: photo, photo_v2, sketch, cartoon, clutter
    synthshift.yaml               the suite (ID textile, the others OOD)
    synthshift-b2n.yaml           base-to-new on the textile test set

Images are rendered with seeds that pre-training never used, so no test image was seen.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from saft.data.synth import write_domain
from saft.io import atomic_path

ID_DOMAIN = "textile"
OOD_DOMAINS = ("photo", "photo_v2", "sketch", "cartoon", "clutter")
WORLD_SEED = 7  # pre-training renders with seed 0
POOL_PER_CLASS = 64
TEST_PER_CLASS = 100


def suite_document(name: str, entries: list[dict]) -> str:
    return yaml.safe_dump({"name": name, "datasets": entries}, sort_keys=False)


def build_world(root: str | Path, *, pool_per_class: int = POOL_PER_CLASS, test_per_class: int = TEST_PER_CLASS,
                log=print) -> Path:
    """Render (or complete) the world under ``root``; existing images are kept."""
    root = Path(root)
    log(f"rendering the embedded world into {root} ({pool_per_class} pool + {test_per_class} test images per "
        f"class and domain; existing files are reused)")
    write_domain(root / ID_DOMAIN / "pool", ID_DOMAIN, pool_per_class, seed=WORLD_SEED)
    write_domain(root / ID_DOMAIN / "test", ID_DOMAIN, test_per_class, seed=WORLD_SEED, start=10_000)
    for domain in OOD_DOMAINS:
        write_domain(root / domain / "test", domain, test_per_class, seed=WORLD_SEED, start=10_000)
    entries = [{"name": ID_DOMAIN, "dataset": "imagefolder", "root": f"{ID_DOMAIN}/test", "role": "id"}]
    entries += [{"name": d, "dataset": "imagefolder", "root": f"{d}/test", "role": "ood"} for d in OOD_DOMAINS]
    b2n = [{"name": f"{ID_DOMAIN}/base", "dataset": "imagefolder", "root": f"{ID_DOMAIN}/test", "role": "base"},
           {"name": f"{ID_DOMAIN}/new", "dataset": "imagefolder", "root": f"{ID_DOMAIN}/test", "role": "new"}]
    for name, doc in (("synthshift.yaml", suite_document("synthshift", entries)),
                      ("synthshift-b2n.yaml", suite_document("synthshift-b2n", b2n))):
        with atomic_path(root / name) as tmp:
            tmp.write_text(doc)
    return root
