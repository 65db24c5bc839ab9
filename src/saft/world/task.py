"""The embedded world on disk: the downstream task and the ``synthshift`` suite.

Layout under a world root (every tree an ImageFolder, so every adapter and suite applies)::

    <id>/pool/<shape>/*.png       the ID domain's pool: few-shot train/val are drawn from here
    <id>/test/<shape>/*.png       the ID test set
    <domain>/test/<shape>/*.png   one OOD test set per OOD domain of the version
    synthshift.yaml               the suite (ID first, then the OOD sets)
    synthshift-b2n.yaml           base-to-new on the ID test set
    world.json                    which version the images belong to

``<id>`` is the version's ID domain (``photo`` in the default ``synthshift-v2``). Images are
rendered with a seed pre-training never used, so no pool or test image was seen.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from saft.data.synth import SHAPES, write_domain
from saft.io import atomic_path, write_json
from saft.layout import WORLD_B2N_SUITE, WORLD_MARKER, WORLD_SUITE
from saft.world.spec import DEFAULT_WORLD, WORLD_SEED, World, get_world

_DEFAULT = get_world(DEFAULT_WORLD)
ID_DOMAIN = _DEFAULT.id_domain  # of the default version, which the pipelines render
OOD_DOMAINS = _DEFAULT.ood_domains
POOL_PER_CLASS = _DEFAULT.task.pool_per_class
TEST_PER_CLASS = _DEFAULT.task.test_per_class
MARKER = WORLD_MARKER


class WorldMismatchError(ValueError):
    """A world folder holds another version's images."""


def suite_document(name: str, entries: list[dict]) -> str:
    return yaml.safe_dump({"name": name, "datasets": entries}, sort_keys=False)


def _check_marker(root: Path, world: World) -> None:
    marker = root / MARKER
    if marker.is_file():
        found = json.loads(marker.read_text()).get("version")
        if found != world.name:
            raise WorldMismatchError(
                f"{root} holds the {found} world, not {world.name}; give another folder (--out or --world) or "
                f"delete {root} to render {world.name} there")
    elif root.is_dir() and any((root / d).is_dir() for d in ("textile", "photo")):
        raise WorldMismatchError(
            f"{root} holds world images without a {MARKER} (rendered before world versions existed); delete it "
            f"or give another folder (--out or --world)")


def build_world(root: str | Path, *, pool_per_class: int = POOL_PER_CLASS, test_per_class: int = TEST_PER_CLASS,
                version: str | None = None, log=print) -> Path:
    """Render (or complete) world ``version`` under ``root``; existing images are kept."""
    root, world = Path(root), get_world(version)
    _check_marker(root, world)
    log(f"rendering the embedded world {world.name} into {root} ({pool_per_class} pool + {test_per_class} test "
        f"images per class and domain; existing files are reused)")
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / MARKER, {"version": world.name, "id": world.id_domain, "ood": list(world.ood_domains)})
    write_domain(root / world.pool_dir, world.id_domain, pool_per_class, WORLD_SEED, 0, world.render)
    for domain in world.domains:
        write_domain(root / domain / "test", domain, test_per_class, WORLD_SEED, 10_000, world.render)
    idd = world.id_domain
    entries = [{"name": idd, "dataset": "imagefolder", "root": f"{idd}/test", "role": "id"}]
    entries += [{"name": d, "dataset": "imagefolder", "root": f"{d}/test", "role": "ood"} for d in world.ood_domains]
    b2n = [{"name": f"{idd}/base", "dataset": "imagefolder", "root": f"{idd}/test", "role": "base"},
           {"name": f"{idd}/new", "dataset": "imagefolder", "root": f"{idd}/test", "role": "new"}]
    for name, doc in ((WORLD_SUITE, suite_document("synthshift", entries)),
                      (WORLD_B2N_SUITE, suite_document("synthshift-b2n", b2n))):
        with atomic_path(root / name) as tmp:
            tmp.write_text(doc)
    return root


def contact_sheet(path: str | Path, version: str | None = None, per_class: int = 2, zoom: int = 3) -> Path:
    """A PNG of the version's sets: one row per domain and index, one column per class (pool images, no test)."""
    from PIL import Image, ImageDraw

    world = get_world(version)
    cell, label = 32 * zoom, 70
    rows = [(d, i) for d in world.domains for i in range(per_class)]
    sheet = Image.new("RGB", (label + cell * len(SHAPES), 16 + cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, shape in enumerate(SHAPES):
        draw.text((label + c * cell + 2, 2), shape, fill="black")
    for r, (domain, index) in enumerate(rows):
        y = 16 + r * cell
        draw.text((2, y + cell // 2 - 6), domain + (" (ID)" if domain == world.id_domain else ""), fill="black")
        for c, shape in enumerate(SHAPES):
            img = world.render(domain, shape, index, WORLD_SEED).image.resize((cell, cell), Image.NEAREST)
            sheet.paste(img, (label + c * cell, y))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)
