"""The repository's ``components/`` and ``pipelines/`` folders, where the Kubeflow definitions live.

Components and pipelines are kept where Kubeflow users share them (one folder each, the
definition beside its compiled YAML), not inside the installed package: a lightweight
component's compiled YAML carries the source of its function, and that function only
calls ``saft.steps`` (which the project image installs), so the package needs none of
them at run time. The ``saft pipeline`` and ``saft components`` commands read the
definitions from the repository, as ``dvc`` reads ``dvc.yaml``: the one named by
``--repo`` or ``SAFT_REPO``, else the checkout this package is installed from, else the
nearest folder above the working directory holding both folders.

- ``components/<name>/component.py`` defines one function named ``<name>``: plain
  Python with kfp type annotations, whose body imports what it needs (it runs in the
  image). ``load_components(image)`` turns every one into a kfp component for ``image``.
- ``pipelines/<name>/pipeline.py`` defines ``build(cfg, components)`` (the pipeline
  function), ``arguments(params, tracking)`` (params.yaml as its arguments) and
  ``DESCRIPTION``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType, SimpleNamespace

REPO_ENV = "SAFT_REPO"
COMPONENT_FILE = "component.py"
PIPELINE_FILE = "pipeline.py"


def _is_repo(folder: Path) -> bool:
    return (folder / "components").is_dir() and (folder / "pipelines").is_dir()


def find_repository(repo: str | os.PathLike | None = None) -> Path:
    """The repository holding ``components/`` and ``pipelines/`` (see the module docstring)."""
    explicit = repo or os.environ.get(REPO_ENV)
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not _is_repo(path):
            raise ValueError(f"{path} holds no components/ and pipelines/ folders (from --repo or ${REPO_ENV}); "
                             "point it at a saft-pipeline checkout")
        return path
    checkout = Path(__file__).resolve().parents[3]  # src/saft/orchestration/repository.py -> the checkout
    if _is_repo(checkout):
        return checkout
    for folder in [Path.cwd(), *Path.cwd().parents]:
        if _is_repo(folder):
            return folder
    raise ValueError("no saft-pipeline checkout found (components/ and pipelines/ folders): run from one, or pass "
                     f"--repo PATH (or set ${REPO_ENV})")


def _load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # kfp reads the function's source through its module
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def component_functions(repo: Path) -> dict[str, object]:
    """``name -> function`` for every ``components/<name>/component.py``."""
    found = {}
    for path in sorted((repo / "components").glob(f"*/{COMPONENT_FILE}")):
        name = path.parent.name
        module = _load_module(path, f"saft_components.{name}")
        if not callable(getattr(module, name, None)):
            raise ValueError(f"{path} defines no function {name}() (each component file defines the function "
                             "named after its folder)")
        found[name] = getattr(module, name)
    if not found:
        raise ValueError(f"{repo / 'components'} holds no */{COMPONENT_FILE}")
    return found


def load_components(image: str, repo: str | os.PathLike | None = None) -> SimpleNamespace:
    """Every component for ``image`` (kfp is preinstalled there, so it is not pip-installed at start)."""
    from kfp import dsl

    functions = component_functions(find_repository(repo))
    return SimpleNamespace(**{name: dsl.component(fn, base_image=image, install_kfp_package=False)
                              for name, fn in functions.items()})


def pipeline_names(repo: str | os.PathLike | None = None) -> list[str]:
    return sorted(p.parent.name for p in (find_repository(repo) / "pipelines").glob(f"*/{PIPELINE_FILE}"))


@lru_cache(maxsize=None)
def _pipeline_module(repo: Path, name: str) -> ModuleType:
    path = repo / "pipelines" / name / PIPELINE_FILE
    if not path.is_file():
        known = ", ".join(pipeline_names(repo)) or "none"
        raise ValueError(f"no pipeline {name!r} (no {path}); known: {known}")
    return _load_module(path, f"saft_pipelines.{name}")


def load_pipeline(name: str, repo: str | os.PathLike | None = None) -> ModuleType:
    """The module of ``pipelines/<name>/pipeline.py``."""
    return _pipeline_module(find_repository(repo), name)


def package_path(name: str, repo: str | os.PathLike | None = None) -> Path:
    """Where the reviewed compiled YAML of pipeline ``name`` is checked in."""
    return find_repository(repo) / "pipelines" / name / "pipeline.yaml"


__all__ = ["component_functions", "find_repository", "load_components", "load_pipeline", "package_path",
           "pipeline_names"]
