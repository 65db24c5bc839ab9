"""What a served model's environment installs: the project's own wheel and exact pins.

``saft==VERSION`` names a release no package index serves, so every environment manager
but ``local`` failed on it. Instead the logged model carries

* ``wheels/saft-VERSION-py3-none-any.whl``: the ``saft`` package exactly as it is imported
  by the process that registers the model (code and package data), built here from the
  installed files, so no source tree or build backend is needed (the project image has
  neither). The serving wheel (:func:`build_serving_wheel`) leaves out the embedded
  world's 4 MB checkpoint (a served model's base comes from the registry, stored once per
  fingerprint) and requires only the library and the ``serve`` extra of pyproject.toml;
* ``constraints.txt``: ``name==version`` for every distribution that wheel needs,
  transitively, as installed here (:func:`serving_closure`): torch, open_clip, MLflow's
  client, the HTTP stack, not the pipeline's kfp, dvc or kubernetes.

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
SERVE_EXTRA = "serve"
# package data a served model never reads: its base is stored in the registry
SERVING_EXCLUDES = ("models/tiny/saft-tiny-clip.safetensors",)
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


def _serving_metadata(meta: str, extra: str) -> str:
    """``meta`` (METADATA) with the requirements of the library and ``extra`` only, unconditional, no long text."""
    from packaging.requirements import Requirement

    headers, _, _ = meta.partition("\n\n")
    lines, requires = [], []
    for line in headers.splitlines():
        key = line.partition(":")[0]
        if key == "Requires-Dist":
            req = Requirement(line.partition(":")[2].strip())
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                req.marker = None
                requires.append(f"Requires-Dist: {req}")
        elif key not in ("Provides-Extra", "Description-Content-Type"):
            lines.append(line)
    return "\n".join(lines + sorted(set(requires))) + "\n"


def build_project_wheel(out_dir: str | Path, *, serving: bool = False) -> Path:
    """Write the wheel of the importable ``saft`` package into ``out_dir``; returns its path.

    ``serving``: the wheel a registered model installs (no embedded checkpoint; the
    library's and the ``serve`` extra's requirements only).
    """
    dist = metadata.distribution(PROJECT)
    version = dist.version
    package = Path(__file__).resolve().parents[1]  # src/saft/serving/wheel.py -> the saft package
    info = f"{PROJECT}-{version}.dist-info"
    entries: list[tuple[str, bytes]] = []
    for path in _package_files(package):
        rel = path.relative_to(package).as_posix()
        if not (serving and rel in SERVING_EXCLUDES):
            entries.append((f"{PROJECT}/{rel}", path.read_bytes()))
    meta = dist.read_text("METADATA") or ""
    if not meta:
        raise RuntimeError(f"the installed {PROJECT} distribution has no METADATA: reinstall it (pip install -e .)")
    if serving:
        meta = _serving_metadata(meta, SERVE_EXTRA)
    entries.append((f"{info}/METADATA", meta.encode()))
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


def build_serving_wheel(out_dir: str | Path) -> Path:
    """The wheel a registered model's environment installs (see :func:`build_project_wheel`)."""
    return build_project_wheel(out_dir, serving=True)


@functools.lru_cache(maxsize=4)  # the environment does not change under a running process
def _closure(root: str, extras: frozenset[str]) -> tuple[str, ...]:
    return tuple(_walk(root, extras))


def pinned_closure(root: str = PROJECT, extras: tuple[str, ...] = ()) -> list[str]:
    """``name==version`` of every installed distribution ``root`` (with ``extras``) needs, transitively, sorted.

    Local version labels are dropped (``torch==2.14.1`` matches ``2.14.1+cu130``): an index
    serves the public version. A requirement that is not installed is skipped; it is not
    part of the environment being reproduced.
    """
    return list(_closure(root, frozenset(extras)))


def serving_closure() -> list[str]:
    """The pins of a served model's environment: the library and the ``serve`` extra, transitively."""
    return pinned_closure(PROJECT, (SERVE_EXTRA,))


def mlflow_requirement() -> str:
    """The MLflow a served model's environment installs: the client (``mlflow-skinny``) at the version here."""
    return f"mlflow-skinny=={metadata.version('mlflow-skinny').split('+', 1)[0]}"


def _walk(root: str, extras: frozenset[str] = frozenset()) -> list[str]:
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name(root), frozenset(extras))]
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
