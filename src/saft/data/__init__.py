"""Data layer: storage roots (local or S3), ImageFolder adapter, few-shot manifests, validation.

The torch ``ManifestDataset`` lives in :mod:`saft.data.dataset` and is imported lazily,
so manifest and validation tools work without loading torch.
"""

from __future__ import annotations

from typing import Any

from saft.data.fewshot import FewShotError, FewShotSplit, select_few_shot, split_base_new, subsample_classes
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
from saft.data.validate import DataValidationError, ValidationReport, skip_corrupt, validate_root

__all__ = [
    "BlobCache",
    "ChecksumMismatchError",
    "DataValidationError",
    "FewShotError",
    "FewShotSplit",
    "IMAGE_EXTENSIONS",
    "ImageEntry",
    "ImageFolderIndex",
    "LocalStorage",
    "ManifestDataset",
    "ManifestEntry",
    "ManifestError",
    "ObjectNotFoundError",
    "S3Storage",
    "Storage",
    "StorageError",
    "UnsafePathError",
    "ValidationReport",
    "check_relpath",
    "hash_entries",
    "manifest_hash",
    "open_storage",
    "read_manifest",
    "scan_image_folder",
    "select_few_shot",
    "skip_corrupt",
    "split_base_new",
    "subsample_classes",
    "validate_root",
    "write_manifest",
]


def __getattr__(name: str) -> Any:
    if name == "ManifestDataset":
        from saft.data.dataset import ManifestDataset

        return ManifestDataset
    raise AttributeError(f"module 'saft.data' has no attribute {name!r}")
