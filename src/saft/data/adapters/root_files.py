"""Reading the small index files of a dataset root and checking that listed images exist.

Split files and class lists name images by path; a partial download or a wrong root
makes those names point at nothing, which otherwise surfaces much later as a worker crash
in the middle of training. The layouts therefore check every listed path against one
listing of the image folder up front and report how many are missing, with examples.
"""

from __future__ import annotations

from typing import Iterable

from saft.data.adapters.errors import LayoutError
from saft.data.paths import UnsafePathError, check_relpath
from saft.data.storage import ObjectNotFoundError, Storage

_EXAMPLES = 5


def join_relpath(*parts: str) -> str:
    """Join root-relative path parts, skipping empty ones (``""`` stands for the root)."""
    return "/".join(part for part in parts if part)


def examples(items: Iterable[str], limit: int = _EXAMPLES) -> str:
    """Up to ``limit`` quoted items, with a count of the rest, for error messages."""
    items = list(items)
    shown = ", ".join(repr(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def read_root_text(storage: Storage, relpath: str, *, dataset: str, hint: str) -> str:
    """A UTF-8 text file of the root; a missing file is a :class:`LayoutError` showing the expected layout."""
    try:
        data = storage.read_bytes(relpath)
    except ObjectNotFoundError:
        raise LayoutError(
            f"{dataset}: {storage.uri_for(relpath)} does not exist; is {storage.uri} the dataset root? "
            f"Expected layout: {hint}"
        ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LayoutError(f"{dataset}: {storage.uri_for(relpath)} is not UTF-8 text ({err})") from None


def safe_relpath(relpath: str, where: str) -> str:
    """``relpath`` if it stays inside the root, else a :class:`LayoutError` naming ``where``."""
    try:
        return check_relpath(relpath)
    except UnsafePathError as err:
        raise LayoutError(f"{where}: {err}") from None


def check_files_present(storage: Storage, folder: str, relpaths: Iterable[str], *, dataset: str, source: str) -> None:
    """Raise :class:`LayoutError` if any of ``relpaths`` (root-relative, under ``folder``) is absent."""
    present = set(storage.list_files(folder) if folder else storage.list_files())
    missing = [path for path in relpaths if path not in present]
    if missing:
        location = storage.uri_for(folder) if folder else storage.uri
        raise LayoutError(
            f"{dataset}: {len(missing)} image(s) named by {source} are missing under {location}: "
            f"{examples(missing)}. Finish the download (or point the root at the complete copy); "
            "to scan a partial copy on purpose, pass check_files=False"
        )
