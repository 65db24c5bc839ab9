"""Relative-path rules shared by storage, manifests and validation.

Manifests name files relative to a dataset root so the same manifest works for a local
copy and for the S3 original. A path that is absolute, climbs out with ``..`` or is not
in normal form could read files outside the dataset (or name one file two ways, which
breaks duplicate and hash bookkeeping), so every layer checks paths with these helpers.
"""

from __future__ import annotations

import posixpath
import re


class UnsafePathError(ValueError):
    """A path from a manifest or a listing would leave the dataset root."""


_DRIVE = re.compile(r"^[A-Za-z]:")


def check_relpath(relpath: str) -> str:
    """Return ``relpath`` unchanged if it is a safe, normalised relative POSIX path.

    Raises :class:`UnsafePathError` explaining what is wrong and how to write it instead.
    """
    if not isinstance(relpath, str) or not relpath:
        raise UnsafePathError(f"path {relpath!r} must be a non-empty string relative to the dataset root")
    if "\x00" in relpath:
        raise UnsafePathError(f"path {relpath!r} contains a NUL byte")
    if "\\" in relpath:
        raise UnsafePathError(f"path {relpath!r} contains a backslash; use '/' as the separator")
    if relpath.startswith("/") or _DRIVE.match(relpath):
        raise UnsafePathError(f"path {relpath!r} is absolute; manifest paths must be relative to the dataset root")
    parts = relpath.split("/")
    if ".." in parts:
        raise UnsafePathError(f"path {relpath!r} contains '..' and would escape the dataset root")
    if posixpath.normpath(relpath) != relpath or "." in parts:
        raise UnsafePathError(
            f"path {relpath!r} is not in normal form; write it as {posixpath.normpath(relpath)!r}"
        )
    return relpath

