"""Dataset adapters: ImageNet, its distribution shifts and the CoOp datasets, from spec files.

``get_adapter(name)`` returns a :class:`DatasetAdapter` built from
``saft/data/specs/<name>.yaml``; ``list_adapters()`` names them all. An adapter indexes a
root (local or ``s3://``) with :meth:`DatasetAdapter.scan` into the same
:class:`~saft.data.ImageFolderIndex` the rest of the data layer uses, and knows its class
names, prompt templates, whether it is evaluation-only and, for ImageNet-A/-R, which of
the 1000 ImageNet classes it covers (evaluation restricts logits to those).

Layout kinds, one code path each: ``class-folders`` and ``index-folders``
(:mod:`.folders`), ``split-json`` (:mod:`.split_json`), ``aircraft-txt``
(:mod:`.aircraft_txt`). The spec format is documented in :mod:`.spec`.
"""

from __future__ import annotations

from saft.data.adapters.adapter import DatasetAdapter
from saft.data.adapters.errors import AdapterError, EvalOnlyError, LayoutError, SpecError, UnknownDatasetError
from saft.data.adapters.registry import adapter_from_spec_file, get_adapter, list_adapters
from saft.data.adapters.spec import LAYOUTS, DatasetSpec, check_template, load_spec_file

__all__ = [
    "AdapterError",
    "DatasetAdapter",
    "DatasetSpec",
    "EvalOnlyError",
    "LAYOUTS",
    "LayoutError",
    "SpecError",
    "UnknownDatasetError",
    "adapter_from_spec_file",
    "check_template",
    "get_adapter",
    "list_adapters",
    "load_spec_file",
]
