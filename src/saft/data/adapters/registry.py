"""The adapter registry: one adapter per spec file shipped in ``saft/data/specs``.

Adding a dataset whose layout is one of the known kinds means adding a YAML file there;
:func:`list_adapters` picks it up without any code change.
"""

from __future__ import annotations

import os

from saft.data.adapters.adapter import DatasetAdapter
from saft.data.adapters.spec import DEFAULT_TEMPLATE_SET, load_packaged_spec, load_spec_file, packaged_spec_names


def list_adapters() -> list[str]:
    """Names of all available dataset adapters, sorted."""
    return list(packaged_spec_names())


def get_adapter(name: str, templates: str = DEFAULT_TEMPLATE_SET) -> DatasetAdapter:
    """The adapter called ``name``, using the prompt set ``templates``.

    Raises :class:`~saft.data.adapters.UnknownDatasetError` (listing the known names) for
    an unknown dataset, and :class:`~saft.data.adapters.AdapterError` for an unknown
    template set.
    """
    return DatasetAdapter(load_packaged_spec(name), templates)


def adapter_from_spec_file(path: str | os.PathLike, templates: str = DEFAULT_TEMPLATE_SET) -> DatasetAdapter:
    """An adapter for a spec file outside the package (a private dataset in a known layout)."""
    return DatasetAdapter(load_spec_file(path), templates)
