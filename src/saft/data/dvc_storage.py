"""A dataset root tracked by DVC, read at one git revision through DVC's own API.

``DvcStorage(repo, path, rev)`` lists and reads the files of ``path`` (a folder added with
``dvc add``) as they were at ``rev`` of ``repo`` (a local repository or a git URL), from
the working tree, the DVC cache or the DVC remote, whichever holds them; DVC does the
lookup (``dvc.api.DVCFileSystem``). ``content_hash()`` is DVC's hash of the whole folder
at that revision (the ``md5`` of its ``.dvc`` file), the data version a pipeline keys its
caches on. Fetched files go to the content-addressed blob cache like S3 objects do.
"""

from __future__ import annotations

import os
import posixpath
import threading
from pathlib import Path
from typing import Any, BinaryIO

from saft.data.paths import check_relpath
from saft.data.storage import BlobCache, ObjectNotFoundError, Storage, StorageError, sha256_file

_CHUNK = 1 << 20


class NotDvcTrackedError(StorageError):
    """The path is not (inside) a folder or file tracked by DVC at that revision."""


class DvcStorage(Storage):
    def __init__(self, repo: str | os.PathLike, path: str, rev: str | None = None, *,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.repo, self.rev = os.fspath(repo), rev or None
        self.path = posixpath.normpath(path.replace(os.sep, "/")).strip("/")
        if self.path.startswith(".."):
            raise StorageError(f"{path!r} leaves the repository {self.repo}")
        self.uri = f"dvc://{self.repo}@{self.rev or 'workspace'}/{self.path}"
        self.cache = BlobCache(cache_dir)
        self._fs: Any = None
        self._lock = threading.Lock()

    # The DVC filesystem holds a repository handle; rebuild it in each process.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def fs(self) -> Any:
        with self._lock:
            if self._fs is None:
                from dvc.api import DVCFileSystem

                try:
                    self._fs = DVCFileSystem(self.repo, rev=self.rev)
                except Exception as exc:  # scm/dvc errors have no common base worth naming
                    raise StorageError(f"cannot open DVC repository {self.repo} at revision "
                                       f"{self.rev or 'working tree'}: {type(exc).__name__}: {exc}") from None
            return self._fs

    def content_hash(self) -> str:
        """DVC's content hash of the tracked folder (or file) at this revision."""
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            raise NotDvcTrackedError(f"{self.path} does not exist in {self.repo} at revision "
                                     f"{self.rev or 'working tree'}") from None
        dvc_info = info.get("dvc_info") or {}
        md5 = dvc_info.get("md5") or info.get("md5")
        if not md5:
            raise NotDvcTrackedError(
                f"{self.path} in {self.repo} is not tracked by DVC (no .dvc file or dvc.lock output covers it); "
                f"track it with `dvc add {self.path}`, or use it as a plain folder (leave data.rev empty)")
        return str(md5).removesuffix(".dir")

    def _full(self, relpath: str) -> str:
        check_relpath(relpath)
        return f"{self.path}/{relpath}" if self.path else relpath

    def list_files(self, prefix: str = "") -> list[str]:
        base = self._full(prefix) if prefix else self.path
        try:
            found = self.fs.find(base, detail=False)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.uri_for(prefix)} does not exist") from None
        skip = len(self.path) + 1 if self.path else 0
        return sorted(p[skip:] for p in found)

    def read_bytes(self, relpath: str) -> bytes:
        try:
            return self.fs.cat_file(self._full(relpath))
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.uri_for(relpath)} does not exist") from None

    def fetch(self, relpath: str, expected_sha256: str | None = None) -> Path:
        if expected_sha256 is not None:
            cached = self.cache.get(expected_sha256)
            if cached is not None:
                return cached
        full, source = self._full(relpath), self.uri_for(relpath)

        def copy(sink: BinaryIO) -> None:
            try:
                with self.fs.open(full, "rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        sink.write(chunk)
            except FileNotFoundError:
                raise ObjectNotFoundError(f"{source} does not exist") from None

        return self.cache.put(copy, expected_sha256, source)

    def sha256(self, relpath: str) -> str:
        return sha256_file(self.fetch(relpath))


def find_dvc_repo(path: str | os.PathLike) -> Path | None:
    """The DVC repository (a folder holding ``.dvc/``) that contains ``path``, if any."""
    here = Path(path).expanduser().absolute()
    for folder in [here, *here.parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


__all__ = ["DvcStorage", "NotDvcTrackedError", "find_dvc_repo"]
