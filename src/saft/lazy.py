"""Package exports loaded on first use (PEP 562).

A light task (a pipeline component that reads JSON, the ``saft`` command line printing
its help, a config being checked) imports ``saft.sparse.config`` or ``saft.models.tiny``
without paying for torch and open_clip; the package's public names still resolve as
``from saft.sparse import finetune``.
"""

from __future__ import annotations

import importlib


def exports(package: str, home: dict[str, tuple[str, ...]]):
    """``__getattr__`` and ``__dir__`` for ``package`` exporting each module's names lazily."""
    where = {name: module for module, names in home.items() for name in names}

    def __getattr__(name: str):
        if name in where:
            value = getattr(importlib.import_module(where[name]), name)
            setattr(importlib.import_module(package), name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(importlib.import_module(package))) | set(where))

    return __getattr__, __dir__
