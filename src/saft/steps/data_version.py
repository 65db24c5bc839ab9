"""The version of the training data a run reads: the key that pipeline caches follow.

A pipeline's arguments name *where* the data is (``data.root``), not *what* it holds, so
a recurring run with unchanged arguments would be served from cache forever while new
images land under the same prefix. The retrain pipeline therefore resolves the data's
version at run time, in a task that is never cached, and hands the version to every task
that reads data. Four kinds, by root:

- ``dvc``: a folder tracked by DVC (``dvc add data/NAME``) in a git repository, at a git
  revision (``data.rev``; empty: the working tree) of that repository (``data.repo``;
  empty: the repository the root is in). The version is DVC's content hash of the folder
  at that revision (the ``md5`` its ``.dvc`` file records), read with ``dvc.api``;
  the files are read at that revision too (:class:`saft.data.dvc_storage.DvcStorage`).
- ``s3``: a plain ``s3://bucket/prefix``: a sha256 over the sorted listing of the objects
  under the prefix (key, ETag, size). ETags change with an object's content, so an
  added, removed or rewritten object gives another version; reading the listing costs
  one request per 1,000 objects.
- ``files``: a plain local folder: a sha256 over the sorted (path, size, mtime) of its
  files (no file is read).
- ``world``: the embedded world, rendered deterministically from its parameters and the
  renderer's code: a hash of both.

Versions look like ``dvc-3c8dc2c4...``, ``s3-9f1e...``; they are content hashes, so two
runs over the same data agree whatever else differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

DVC, S3, FILES, WORLD = "dvc", "s3", "files", "world"
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://|^git@", re.I)


class DataVersionError(ValueError):
    """The data's version cannot be read, or differs from the one the run was asked for."""


@dataclass(frozen=True)
class DataVersion:
    version: str  # the cache key: "<kind>-<hash>"
    kind: str  # dvc | s3 | files | world
    root: str  # as given (a path inside the repository for dvc)
    rev: str = ""  # dvc: the git revision asked for ("" = working tree)
    repo: str = ""  # dvc: the repository (path or git URL)
    path: str = ""  # dvc: the tracked folder's path inside the repository
    files: int | None = None  # number of files/objects behind the version, when known

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DataVersion":
        return cls(**data)

    @property
    def describe(self) -> str:
        where = f"{self.root} at {self.rev}" if self.rev else self.root or "the embedded world"
        count = f", {self.files:,} files" if self.files is not None else ""
        return f"{self.version} ({self.kind}: {where}{count})"


def _digest(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def world_version(pool_per_class: int, test_per_class: int) -> DataVersion:
    """The embedded world: its version, parameters and the renderer's release decide every pixel."""
    from saft.version import __version__
    from saft.world.spec import DEFAULT_WORLD

    spec = json.dumps({"pool_per_class": pool_per_class, "test_per_class": test_per_class, "saft": __version__,
                       "world": DEFAULT_WORLD}, sort_keys=True)
    return DataVersion(f"{WORLD}-{_digest([spec])[:16]}", WORLD, "")


def s3_version(root: str) -> DataVersion:
    from saft.data.storage import S3Storage

    storage = S3Storage(root)
    base = f"{storage.prefix}/" if storage.prefix else ""
    rows = []
    try:
        for page in storage.client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    etag = obj.get("ETag", "").strip('"')
                    rows.append(f"{obj['Key'][len(base):]}\t{etag}\t{obj.get('Size', 0)}")
    except Exception as exc:  # botocore's errors share no useful base here
        raise DataVersionError(f"cannot list {storage.uri} to version it: {type(exc).__name__}: {exc}; check the "
                               "AWS_* credentials and endpoint of this task") from None
    if not rows:
        raise DataVersionError(f"{storage.uri} holds no objects: nothing to train on (check data.root)")
    rows.sort()
    return DataVersion(f"{S3}-{_digest(rows)[:32]}", S3, root, files=len(rows))


def files_version(root: str) -> DataVersion:
    from saft.data.storage import LocalStorage

    storage = LocalStorage(root)
    rows = []
    for rel in storage.list_files():
        st = os.stat(storage.root / rel)
        rows.append(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}")
    if not rows:
        raise DataVersionError(f"{storage.root} holds no files: nothing to train on (check data.root)")
    return DataVersion(f"{FILES}-{_digest(rows)[:32]}", FILES, root, files=len(rows))


def dvc_storage(root: str, rev: str = "", repo: str = ""):
    """The :class:`DvcStorage` for ``root`` if DVC tracks it (in ``repo`` at ``rev``), else None."""
    from saft.data.dvc_storage import DvcStorage, NotDvcTrackedError, find_dvc_repo

    if repo and _URL.match(repo):
        return DvcStorage(repo, root, rev)  # a remote repository: root is a path inside it
    where = Path(repo).expanduser().absolute() if repo else find_dvc_repo(root)
    if where is None:
        if rev or repo:
            raise DataVersionError(f"data.rev/data.repo are set but {root} is not inside a DVC repository; "
                                   "leave them empty for a plain folder, or track the data with `dvc add`")
        return None
    absolute = Path(root).expanduser().absolute() if not Path(root).is_absolute() else Path(root)
    try:
        rel = absolute.relative_to(where).as_posix()
    except ValueError:
        raise DataVersionError(f"data.root {root} is not inside the repository {where}") from None
    storage = DvcStorage(where, rel, rev)
    try:
        storage.content_hash()
    except NotDvcTrackedError as exc:
        if rev:
            raise DataVersionError(str(exc)) from None
        return None
    return storage


def resolve_data_version(root: str, *, rev: str = "", repo: str = "", pool_per_class: int = 64,
                         test_per_class: int = 100, expected: str = "") -> DataVersion:
    """The version of ``root`` now; ``expected`` (when given) must match it."""
    if not root:
        if rev or repo:
            raise DataVersionError("data.rev/data.repo need a data.root (the DVC-tracked folder to read)")
        found = world_version(pool_per_class, test_per_class)
    elif root.startswith("s3://"):
        if rev:
            raise DataVersionError(f"data.rev {rev!r} applies to DVC-tracked data, not to the plain prefix {root}")
        found = s3_version(root)
    else:
        storage = dvc_storage(root, rev, repo)
        if storage is not None:
            from saft.data.storage import StorageError

            try:
                digest = storage.content_hash()
                count = len(storage.list_files())
            except StorageError as exc:
                raise DataVersionError(str(exc)) from None
            found = DataVersion(f"{DVC}-{digest}", DVC, root, rev=rev, repo=storage.repo, path=storage.path,
                                files=count)
        else:
            found = files_version(root)
    if expected and expected != found.version:
        raise DataVersionError(f"data.version is {expected!r} but {root or 'the embedded world'} is now "
                               f"{found.version}: the data changed since that version was taken; drop data.version "
                               "to train on what is there, or restore the data")
    return found


def reader_for(version: DataVersion):
    """What prepare reads: a DVC storage at the version's revision, else the root itself.

    A DVC root without a revision is the working tree, read as a plain folder (the same
    files, without going through DVC).
    """
    if version.kind == DVC and version.rev:
        from saft.data.dvc_storage import DvcStorage

        return DvcStorage(version.repo, version.path, version.rev)
    return version.root


__all__ = ["DVC", "FILES", "S3", "WORLD", "DataVersion", "DataVersionError", "dvc_storage", "reader_for",
           "resolve_data_version"]
