"""A local, content-addressed cache of remote files, bounded in size.

Training and evaluation read every image of an S3 root many times, so each object is
downloaded once into ``<cache>/<first two hex digits>/<sha256>``. Keying by content (not
by URI) means two roots holding the same image share one copy, and every lookup
re-verifies that the bytes still match their name.

The cache is bounded: ``SAFT_CACHE_MAX_GB`` (gigabytes of 10^9 bytes, fractions allowed;
unset: :data:`DEFAULT_MAX_GB`; ``none`` or ``0``: no bound). On a pod the cache lives on
ephemeral storage, and a pod that writes past its ephemeral-storage limit is evicted, so
set the bound below that limit (minus room for the step's outputs). When a write takes
the cache over the bound, the least recently used blobs are deleted until it is back
under :data:`LOW_WATER` of the bound, so one eviction makes room for many writes.

How the bookkeeping stays cheap and safe with 16k to 1.28M blobs and several processes
(DataLoader workers, pods on one node) sharing one folder:

- Recency is the file's modification time: a hit touches it (many mounts use
  ``noatime``, so access times cannot be trusted), a new blob is written now.
- Each process keeps a running tally of the bytes in the cache, built by one scan at its
  first write and then advanced by its own writes, so a write costs no scan. After
  every low-water margin (10 % of the bound) of its own writes, and at every eviction,
  it scans the folder again, which counts what other processes wrote: the folder can
  pass the bound by at most one margin per writing process.
- Before a blob is deleted it is looked at once more: one that another process used since
  the scan is kept, one that is already gone is fine (someone else evicted it).
- Only files named like blobs (``<2 hex>/<64 hex>`` with matching prefix) are counted or
  ever deleted: ``.partial-*`` files being written, the evaluation head cache under
  ``$SAFT_CACHE_DIR/heads`` and anything else in the folder are left alone and not
  counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from saft.data.storage_errors import ChecksumMismatchError, StorageError

log = logging.getLogger(__name__)

CACHE_ENV = "SAFT_CACHE_DIR"
MAX_GB_ENV = "SAFT_CACHE_MAX_GB"
DEFAULT_MAX_GB = 50.0
"""Bound of the blob cache when ``SAFT_CACHE_MAX_GB`` is unset: room for ImageNet's
validation set, its four shifts and a few 16-shot training sets at once."""
LOW_WATER = 0.9
"""An eviction deletes least recently used blobs until the cache holds at most this
fraction of its bound."""
UNBOUNDED = ("none", "0")

_GB = 10**9
_CHUNK = 1 << 20
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_PREFIX_HEX = re.compile(r"^[0-9a-f]{2}$")
_FROM_ENV: Any = object()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hash a file in chunks, so large files do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(value: str) -> str:
    """Return ``value`` if it is a lowercase 64-digit hex sha256, else raise ValueError."""
    if not isinstance(value, str) or not _SHA256_HEX.match(value):
        raise ValueError(f"sha256 {value!r} must be 64 lowercase hex digits")
    return value


def default_cache_dir() -> Path:
    """``$SAFT_CACHE_DIR`` if set, else ``~/.cache/saft/blobs``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saft" / "blobs"


def cache_max_bytes() -> int | None:
    """The bound ``SAFT_CACHE_MAX_GB`` sets, in bytes (None: no bound; unset: 50 GB)."""
    text = os.environ.get(MAX_GB_ENV, "").strip()
    if not text:
        return int(DEFAULT_MAX_GB * _GB)
    if text.lower() in UNBOUNDED:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise StorageError(
            f"{MAX_GB_ENV}={text!r} must be the blob cache's bound in GB (e.g. 50 or 0.5), "
            "or 'none' (or 0) for no bound"
        )
    return None if value == 0 else max(1, int(value * _GB))


@dataclass(frozen=True)
class Blob:
    """One cached file as a scan saw it."""

    path: Path
    size: int
    mtime_ns: int


def _human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


class BlobCache:
    """Files stored under their own sha256, written atomically, evicted least recently used first.

    ``max_bytes`` bounds the bytes of blobs in ``directory`` (None: no bound); by default
    it comes from ``SAFT_CACHE_MAX_GB`` (see the module docstring).
    """

    def __init__(self, directory: str | os.PathLike | None = None, max_bytes: int | None = _FROM_ENV) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        if max_bytes is _FROM_ENV:
            max_bytes = cache_max_bytes()
        elif max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"max_bytes must be a positive number of bytes or None, got {max_bytes!r}")
        self.max_bytes: int | None = max_bytes
        self._tally: int | None = None  # bytes of blobs on disk as this process knows them
        self._unscanned = 0  # bytes this process wrote since it last scanned the folder
        self._new_locks()

    def _new_locks(self) -> None:
        self._pid = os.getpid()
        self._tally_lock = threading.Lock()
        self._evict_lock = threading.Lock()

    # Locks cannot be pickled and must not cross a fork (a thread may hold one); the tally
    # is rebuilt by the copy's first write, which also sees what others wrote meanwhile.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_tally_lock", "_evict_lock", "_pid"):
            del state[name]
        state["_tally"] = None
        state["_unscanned"] = 0
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._new_locks()

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            self._new_locks()

    def path_for(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.directory / sha256[:2] / sha256

    # --- lookups ------------------------------------------------------------------------

    def get(self, sha256: str) -> Path | None:
        """The cached file for ``sha256``, or None when absent or its bytes no longer match."""
        path = self.path_for(sha256)
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            return None
        return path if self._verified(path, actual, sha256) else None

    def read(self, sha256: str) -> bytes | None:
        """The cached bytes for ``sha256`` (read and verified once), or None as :meth:`get`."""
        path = self.path_for(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return data if self._verified(path, sha256_bytes(data), sha256) else None

    def _verified(self, path: Path, actual: str, sha256: str) -> bool:
        if actual == sha256:
            with contextlib.suppress(OSError):  # a read-only cache still serves, it just ages
                os.utime(path)  # the hit makes it the most recently used blob
            return True
        log.warning("cached blob %s is damaged (its sha256 is %s); fetching it again", path, actual)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return False

    # --- writes -------------------------------------------------------------------------

    def put(
        self, write: Callable[[BinaryIO], None], expected_sha256: str | None, source: str
    ) -> Path:
        """Write a blob through ``write(fileobj)`` and file it under its sha256.

        The bytes go to a temporary file in the cache directory first; they are renamed
        into place only after the hash is known (and matches ``expected_sha256`` when given),
        so a reader never sees a partial or wrong blob, even with concurrent writers. A
        write that takes the cache over its bound evicts older blobs, never this one.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".partial-", dir=self.directory)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as raw:
                hashing = _HashingWriter(raw)
                write(hashing)  # type: ignore[arg-type]
                size = hashing.size
            # No fsync: every lookup re-hashes the blob, so one torn by a crash is
            # detected and fetched again; syncing each small image would slow caching a lot.
            actual = hashing.hexdigest()
            if expected_sha256 is not None and actual != expected_sha256:
                raise ChecksumMismatchError(
                    f"{source} has sha256 {actual}, but the manifest expects {expected_sha256}; "
                    "the object changed after the manifest was written. Re-run the prepare step "
                    "to rebuild the manifest, or restore the original object."
                )
            final = self.path_for(actual)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._count(final, size)
        return final

    def put_bytes(self, data: bytes, source: str) -> Path:
        """File bytes already in memory under their sha256 (see :meth:`put`)."""
        return self.put(lambda sink: sink.write(data), None, source)

    def _count(self, written: Path, size: int) -> None:
        if self.max_bytes is None:
            return
        self._check_process()
        margin = max(1, self.max_bytes - int(self.max_bytes * LOW_WATER))
        with self._tally_lock:
            if self._tally is not None:
                self._tally += size  # a blob written twice is counted twice: the next scan corrects it
                self._unscanned += size
            if self._tally is None or self._unscanned >= margin:
                # Also what other processes wrote since the last scan (the new blob included).
                self._tally = sum(blob.size for blob in self.scan())
                self._unscanned = 0
            over = self._tally > self.max_bytes
        if over:
            self.evict(keep=written)

    # --- size and eviction ---------------------------------------------------------------

    def scan(self) -> list[Blob]:
        """Every blob in the folder now (other files are not blobs and are not listed)."""
        blobs: list[Blob] = []
        try:
            prefixes = [entry for entry in os.scandir(self.directory) if _PREFIX_HEX.match(entry.name)]
        except FileNotFoundError:
            return blobs
        for prefix in prefixes:
            try:
                children = list(os.scandir(prefix.path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for child in children:
                if not (_SHA256_HEX.match(child.name) and child.name.startswith(prefix.name)):
                    continue
                try:
                    if not child.is_file(follow_symlinks=False):
                        continue
                    stat = child.stat(follow_symlinks=False)
                except FileNotFoundError:  # evicted by another process while we looked
                    continue
                blobs.append(Blob(Path(child.path), stat.st_size, stat.st_mtime_ns))
        return blobs

    def usage(self) -> int:
        """Bytes of blobs in the folder now (one scan)."""
        return sum(blob.size for blob in self.scan())

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used blobs until the cache holds at most ``LOW_WATER`` of its bound.

        Returns the bytes freed. ``keep`` (the blob just written) is never deleted. Runs in
        one thread at a time; a thread that finds another evicting leaves it to that one.
        """
        if self.max_bytes is None:
            return 0
        self._check_process()
        if not self._evict_lock.acquire(blocking=False):
            return 0
        try:
            with self._tally_lock:
                tally_before = self._tally or 0
            blobs = self.scan()
            total = sum(blob.size for blob in blobs)
            target = int(self.max_bytes * LOW_WATER)
            freed = deleted = 0
            for blob in sorted(blobs, key=lambda b: (b.mtime_ns, b.path.name)):
                if total - freed <= target:
                    break
                if blob.path == keep:
                    continue
                freed_now = self._delete_if_unused(blob)
                if freed_now is not None:
                    freed += freed_now
                    deleted += 1
            with self._tally_lock:
                # Writes by this process's other threads during the scan stay counted.
                self._tally = total - freed + max(0, (self._tally or 0) - tally_before)
                self._unscanned = 0
            if deleted:
                log.info(
                    "blob cache %s reached its bound of %s (%s=%s): deleted %d least recently used blob(s), "
                    "%s; it now holds %s", self.directory, _human(self.max_bytes), MAX_GB_ENV,
                    os.environ.get(MAX_GB_ENV, f"unset, default {DEFAULT_MAX_GB:g}"), deleted,
                    _human(freed), _human(total - freed),
                )
            return freed
        finally:
            self._evict_lock.release()

    def _delete_if_unused(self, blob: Blob) -> int | None:
        """Delete ``blob`` unless it was used since the scan; the bytes it freed (0 if already gone), or None if kept."""
        try:
            if os.stat(blob.path, follow_symlinks=False).st_mtime_ns > blob.mtime_ns:
                return None  # another process read it since the scan: it is not the least recently used
            blob.path.unlink()
        except FileNotFoundError:
            return blob.size  # someone else evicted it: its bytes are gone all the same
        except OSError as err:
            log.warning("cannot delete cached blob %s (%s); leaving it", blob.path, err)
            return None
        return blob.size


class _HashingWriter(io.RawIOBase):
    """Binary sink that hashes what passes through it on the way to ``target``."""

    def __init__(self, target: BinaryIO) -> None:
        self._target = target
        self._digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._digest.update(view)
        self._target.write(view)
        self.size += view.nbytes
        return view.nbytes

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
