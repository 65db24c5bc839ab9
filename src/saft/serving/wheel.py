"""What a served model's environment installs: the project's own wheel and exact pins.

``saft==VERSION`` names a release no package index serves, so every environment manager
but ``local`` failed on it. Instead the logged model carries

* ``wheels/saft-VERSION-py3-none-any.whl``: the ``saft`` package exactly as it is imported
  by the process that registers the model (code and package data), built here from the
  installed files, so no source tree or build backend is needed (the project image has
  neither);
* ``constraints.txt``: ``name==version`` for every distribution the wheel needs,
  transitively, as installed here: the environment that registered the model is the one
  serving rebuilds.

``requirements.txt`` then reads ``wheels/saft-....whl`` and ``-c constraints.txt``; MLflow's
virtualenv manager and ``mlflow models build-docker`` install it from the model folder
(relative paths resolve there). The wheel is deterministic: the same files give the same
bytes (fixed timestamps, sorted entries).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import zipfile
from importlib import metadata
from pathlib import Path

WHEELS_DIR = "wheels"
PROJECT = "saft"
_EPOCH = (1980, 1, 1, 0, 0, 0)
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _package_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not (_SKIP_DIRS & set(p.relative_to(root).parts))
                  and not p.name.endswith(_SKIP_SUFFIXES))


def wheel_name(version: str) -> str:
    return f"{PROJECT}-{re.sub(r'[^A-Za-z0-9.]+', '_', version)}-py3-none-any.whl"


def build_project_wheel(out_dir: str | Path) -> Path:
    """Write the wheel of the importable ``saft`` package into ``out_dir``; returns its path."""
    dist = metadata.distribution(PROJECT)
    version = dist.version
    package = Path(__file__).resolve().parents[1]  # src/saft/serving/wheel.py -> the saft package
    info = f"{PROJECT}-{version}.dist-info"
    entries: list[tuple[str, bytes]] = []
    for path in _package_files(package):
        entries.append((f"{PROJECT}/{path.relative_to(package).as_posix()}", path.read_bytes()))
    meta = (dist.read_text("METADATA") or "").encode()
    if not meta:
        raise RuntimeError(f"the installed {PROJECT} distribution has no METADATA: reinstall it (pip install -e .)")
    entries.append((f"{info}/METADATA", meta))
    entries.append((f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: saft.serving.wheel\n"
                                     b"Root-Is-Purelib: true\nTag: py3-none-any\n"))
    entries.append((f"{info}/top_level.txt", f"{PROJECT}\n".encode()))
    points = dist.read_text("entry_points.txt")
    if points:
        entries.append((f"{info}/entry_points.txt", points.encode()))
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries)
    entries.append((f"{info}/RECORD", (record + f"{info}/RECORD,,\n").encode()))
    from saft.io import atomic_path

    target = Path(out_dir) / wheel_name(version)
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            item = zipfile.ZipInfo(name, date_time=_EPOCH)
            item.compress_type = zipfile.ZIP_DEFLATED
            item.external_attr = 0o644 << 16
            zf.writestr(item, data)
    return target


def _requirements_of(dist_name: str, extras: frozenset[str]):
    from packaging.requirements import Requirement

    for text in metadata.requires(dist_name) or []:
        req = Requirement(text)
        if req.marker is None:
            yield req
            continue
        for extra in extras or {""}:
            if req.marker.evaluate({"extra": extra}):
                yield req
                break


@functools.lru_cache(maxsize=4)  # the environment does not change under a running process
def _closure(root: str) -> tuple[str, ...]:
    return tuple(_walk(root))


def pinned_closure(root: str = PROJECT) -> list[str]:
    """``name==version`` of every installed distribution ``root`` needs, transitively, sorted.

    Local version labels are dropped (``torch==2.14.1`` matches ``2.14.1+cu130``): an index
    serves the public version. A requirement that is not installed is skipped; it is not
    part of the environment being reproduced.
    """
    return list(_closure(root))


def _walk(root: str) -> list[str]:
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name(root), frozenset())]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if name != canonicalize_name(root):
            pins[name] = version.split("+", 1)[0]
        for req in _requirements_of(name, extras):
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return [f"{name}=={version}" for name, version in sorted(pins.items())]
