"""The errors of dataset storage, in a module of their own so the blob cache and the roots share them."""

from __future__ import annotations


class StorageError(RuntimeError):
    """A dataset root cannot be read (missing root, unreachable endpoint, no credentials)."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """A file named by a manifest or listing is not under the root."""


class ChecksumMismatchError(StorageError):
    """File bytes differ from the sha256 the manifest recorded: the data changed."""
