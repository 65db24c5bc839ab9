"""Exceptions of the dataset adapters.

They all derive from :class:`AdapterError` (a ``ValueError``), so a step can catch one
type for "this dataset cannot be used as asked"; the subclasses let callers and tests
tell a typo in a dataset name from a broken spec or a root laid out the wrong way.
"""

from __future__ import annotations


class AdapterError(ValueError):
    """A dataset adapter cannot do what was asked; the message says why and what to do."""


class UnknownDatasetError(AdapterError):
    """No adapter has this name; the message lists the known ones."""


class SpecError(AdapterError):
    """A dataset spec file is malformed, or a source it names no longer holds what it expects."""


class EvalOnlyError(AdapterError):
    """Training was asked of a dataset that exists only to measure out-of-distribution accuracy."""


class LayoutError(AdapterError):
    """A dataset root does not look like the layout its adapter reads (missing files, stray folders)."""
