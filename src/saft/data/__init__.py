"""Data layer: storage roots (local or S3), dataset adapters, few-shot manifests, validation, prepare.

Dataset adapters (``get_adapter(name)``, ``list_adapters()``) index ImageFolder trees,
ImageNet and its shifts and the CoOp datasets; ``prepare_dataset`` turns a split of any
trainable one into few-shot manifests. The torch ``ManifestDataset`` lives in
:mod:`saft.data.dataset` and is imported lazily, so manifest and validation tools work
without loading torch.
"""

from __future__ import annotations

from typing import Any

from saft.data.adapters import (
    AdapterError,
    DatasetAdapter,
    EvalOnlyError,
    LayoutError,
    UnknownDatasetError,
    get_adapter,
    list_adapters,
)
from saft.data.fewshot import FewShotError, FewShotSplit, select_few_shot, split_base_new, subsample_classes
from saft.data.images import ImageDecodeError, load_rgb
from saft.data.imagefolder import IMAGE_EXTENSIONS, ImageEntry, ImageFolderIndex, scan_image_folder
from saft.data.manifest import (
    ManifestEntry,
    ManifestError,
    hash_entries,
    manifest_hash,
    read_manifest,
    write_manifest,
)
from saft.data.paths import UnsafePathError, check_relpath
from saft.data.storage import (
    BlobCache,
    ChecksumMismatchError,
    LocalStorage,
    ObjectNotFoundError,
    S3Storage,
    Storage,
    StorageError,
    open_storage,
)
from saft.data.prepare import PrepareError, PrepareResult, TemplateError, load_templates, prepare_dataset
from saft.data.split_index import DatasetIndex, index_dataset
from saft.data.validate import (
    DataValidationError,
    DatasetCheck,
    ValidationReport,
    skip_corrupt,
    validate_dataset,
    validate_root,
)

__all__ = [
    "AdapterError",
    "BlobCache",
    "ChecksumMismatchError",
    "DataValidationError",
    "DatasetAdapter",
    "DatasetCheck",
    "DatasetIndex",
    "EvalOnlyError",
    "FewShotError",
    "FewShotSplit",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageEntry",
    "ImageFolderIndex",
    "LayoutError",
    "LocalStorage",
    "ManifestDataset",
    "ManifestEntry",
    "ManifestError",
    "ObjectNotFoundError",
    "PrepareError",
    "PrepareResult",
    "S3Storage",
    "Storage",
    "StorageError",
    "TemplateError",
    "UnknownDatasetError",
    "UnsafePathError",
    "ValidationReport",
    "check_relpath",
    "get_adapter",
    "hash_entries",
    "index_dataset",
    "list_adapters",
    "load_rgb",
    "load_templates",
    "manifest_hash",
    "open_storage",
    "prepare_dataset",
    "read_manifest",
    "scan_image_folder",
    "select_few_shot",
    "skip_corrupt",
    "split_base_new",
    "subsample_classes",
    "validate_dataset",
    "validate_root",
    "write_manifest",
]


def __getattr__(name: str) -> Any:
    if name == "ManifestDataset":
        from saft.data.dataset import ManifestDataset

        return ManifestDataset
    raise AttributeError(f"module 'saft.data' has no attribute {name!r}")
