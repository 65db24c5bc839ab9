"""Dataset roots on local disk or S3, with a content-addressed local cache.

Training reads every image many times, but a dataset may live in an S3 bucket
(AWS or MinIO). :class:`S3Storage` therefore downloads each object once into a cache
directory keyed by the sha256 recorded in the manifest, so a cached blob is valid for any
root that holds the same bytes, and a blob whose bytes changed on disk is detected and
fetched again instead of silently training on different data. The cache is bounded
(``SAFT_CACHE_MAX_GB``, least recently used blobs go first; see
:mod:`saft.data.blob_cache`). A file read for one check is streamed with
:meth:`Storage.load_bytes` instead, so a validation scan of a whole split does not fill
the cache (``prepare`` keeps the images it draws, which training reads next). Local
roots need no cache: :class:`LocalStorage` checks the file in place.

S3 settings come from the standard AWS environment (``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
``AWS_DEFAULT_REGION``), the way MinIO and AWS users already configure their tools.
With a custom endpoint, path-style addressing is used (MinIO's default); set
``SAFT_S3_ADDRESSING_STYLE=virtual`` to change it.

Transient failures (5xx, throttling, refused or reset connections, timeouts) are retried
by botocore's "standard" mode with exponential backoff: ``SAFT_S3_MAX_ATTEMPTS`` tries per
request (default 5; ``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE`` are honoured too), each
bounded by ``SAFT_S3_CONNECT_TIMEOUT`` (10 s) and ``SAFT_S3_READ_TIMEOUT`` (60 s). When
the tries run out the error names the object and what to check.
"""

from __future__ import annotations

import abc
import contextlib
import io
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from saft.data.blob_cache import (  # re-exported: storage is where callers look for these
    CACHE_ENV,
    MAX_GB_ENV,
    BlobCache,
    cache_max_bytes,
    check_sha256,
    default_cache_dir,
    sha256_bytes,
    sha256_file,
)
from saft.data.paths import UnsafePathError, check_relpath
from saft.data.storage_errors import ChecksumMismatchError, ObjectNotFoundError, StorageError

log = logging.getLogger(__name__)

MAX_ATTEMPTS_ENV = "SAFT_S3_MAX_ATTEMPTS"
CONNECT_TIMEOUT_ENV = "SAFT_S3_CONNECT_TIMEOUT"
READ_TIMEOUT_ENV = "SAFT_S3_READ_TIMEOUT"
DEFAULT_MAX_ATTEMPTS = 5
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                    "RequestTimeout", "Throttling", "ThrottlingException", "RequestLimitExceeded"}
_CHUNK = 1 << 20


class Storage(abc.ABC):
    """A dataset root: list files, read them, and get a verified local copy."""

    uri: str

    @abc.abstractmethod
    def list_files(self, prefix: str = "") -> list[str]:
        """All file paths under the root (or under ``prefix`` within it), relative, posix, sorted.

        Paths are listed as stored, unsafe ones included, so validation can report them;
        every read refuses them.
        """

    @abc.abstractmethod
    def read_bytes(self, relpath: str) -> bytes:
        """The file's bytes; :class:`ObjectNotFoundError` if it is absent."""

    @abc.abstractmethod
    def fetch(self, relpath: str, expected_sha256: str | None = None) -> Path:
        """A local path holding the file's bytes, verified against ``expected_sha256`` if given."""

    def load_bytes(self, relpath: str, expected_sha256: str | None = None, *, keep: bool = False) -> bytes:
        """The file's bytes for a read that will not be repeated soon (a check, a hash).

        Remote roots serve them from the blob cache when it already holds
        ``expected_sha256`` and otherwise stream them without caching, unless ``keep``
        (for files a later step reads again, like the images ``prepare`` draws). Bytes
        read from the root are not compared with ``expected_sha256``: callers hash them
        anyway and report a mismatch their own way. Local roots read the file in place.
        """
        return self.read_bytes(relpath)

    def open(self, relpath: str) -> BinaryIO:
        """A readable binary file object for ``relpath``."""
        return io.BytesIO(self.read_bytes(relpath))

    def sha256(self, relpath: str) -> str:
        """The sha256 of the file's bytes."""
        return sha256_file(self.fetch(relpath))

    def uri_for(self, relpath: str) -> str:
        """A full location for messages: where a user would look for the file."""
        return f"{self.uri.rstrip('/')}/{relpath}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalStorage(Storage):
    """A directory on a local or mounted filesystem."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().absolute()
        if not self.root.is_dir():
            raise StorageError(f"dataset root {self.root} does not exist or is not a directory")
        self._real_root = self.root.resolve()
        self.uri = str(self.root)

    def path(self, relpath: str) -> Path:
        """The real file for ``relpath``, refusing paths (or symlinks) that leave the root."""
        check_relpath(relpath)
        candidate = self.root / relpath
        real = candidate.resolve()
        if not real.is_relative_to(self._real_root):
            raise UnsafePathError(
                f"{relpath!r} resolves to {real}, outside the dataset root {self.root}; "
                "replace the symlink with a copy of the file inside the root"
            )
        return real

    def list_files(self, prefix: str = "") -> list[str]:
        base = self.root / check_relpath(prefix) if prefix else self.root
        found: list[str] = []
        # Symlinked folders are followed so that their files get listed (and then refused
        # if they resolve outside the root); each real folder is visited once to stop loops.
        visited: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in visited:
                dirnames[:] = []
                continue
            visited.add(real)
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                found.append(name if rel_dir == "." else f"{rel_dir}/{name}")
        return sorted(found)

    def read_bytes(self, relpath: str) -> bytes:
        path = self.path(relpath)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.uri_for(relpath)} does not exist") from None
        except IsADirectoryError:
            raise ObjectNotFoundError(f"{self.uri_for(relpath)} is a directory, not a file") from None

    def fetch(self, relpath: str, expected_sha256: str | None = None) -> Path:
        """The file itself (local files need no cache), checked against ``expected_sha256``."""
        path = self.path(relpath)
        if not path.is_file():
            raise ObjectNotFoundError(f"{self.uri_for(relpath)} does not exist")
        if expected_sha256 is not None:
            actual = sha256_file(path)
            if actual != expected_sha256:
                raise ChecksumMismatchError(
                    f"{self.uri_for(relpath)} has sha256 {actual}, but the manifest expects "
                    f"{expected_sha256}; the file changed after the manifest was written. Re-run "
                    "the prepare step to rebuild the manifest, or restore the original file."
                )
        return path

    def sha256(self, relpath: str) -> str:
        return sha256_file(self.fetch(relpath))


class S3Storage(Storage):
    """An ``s3://bucket/prefix`` root, read through boto3 and cached by content hash."""

    def __init__(
        self,
        uri: str,
        *,
        cache_dir: str | os.PathLike | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.cache = BlobCache(cache_dir)
        self._endpoint_url = endpoint_url
        self._client: Any = None
        self._client_pid: int | None = None
        self._client_lock = threading.Lock()

    # boto3 clients must not cross a fork or a pickle (DataLoader workers): rebuild per process.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None
        state["_client_pid"] = None
        del state["_client_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client_lock = threading.Lock()

    @property
    def client(self) -> Any:
        """A boto3 S3 client for this process; built once and shared by its threads (clients are thread-safe)."""
        with self._client_lock:
            if self._client is None or self._client_pid != os.getpid():
                self._client = _make_s3_client(self._endpoint_url)
                self._client_pid = os.getpid()
            return self._client

    def _key(self, relpath: str) -> str:
        check_relpath(relpath)
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def list_files(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        if prefix:
            base += check_relpath(prefix) + "/"
        found: list[str] = []
        with _s3_errors(self.uri):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/"):  # folder marker objects made by some S3 consoles
                        continue
                    rel = key[len(self.prefix) + 1 :] if self.prefix else key
                    found.append(rel)
        return sorted(found)

    def read_bytes(self, relpath: str) -> bytes:
        key = self._key(relpath)
        with _s3_errors(self.uri_for(relpath)):
            response = self.client.get_object(Bucket=self.bucket, Key=key)
            return response["Body"].read()

    def load_bytes(self, relpath: str, expected_sha256: str | None = None, *, keep: bool = False) -> bytes:
        if expected_sha256 is not None:
            cached = self.cache.read(check_sha256(expected_sha256))
            if cached is not None:
                return cached
        data = self.read_bytes(relpath)
        if keep:
            self.cache.put_bytes(data, self.uri_for(relpath))
        return data

    def fetch(self, relpath: str, expected_sha256: str | None = None) -> Path:
        """A cached local copy; downloaded when absent or when the cached bytes were damaged."""
        key = self._key(relpath)
        if expected_sha256 is not None:
            check_sha256(expected_sha256)
            cached = self.cache.get(expected_sha256)
            if cached is not None:
                return cached
        source = self.uri_for(relpath)

        def download(sink: BinaryIO) -> None:
            with _s3_errors(source):
                body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
                for chunk in body.iter_chunks(_CHUNK):
                    sink.write(chunk)

        return self.cache.put(download, expected_sha256, source)

    def sha256(self, relpath: str) -> str:
        return self.fetch(relpath).name  # cache files are named by their sha256


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/prefix/`` into ``("bucket", "some/prefix")``."""
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; write it as s3://bucket/prefix")
    if prefix:
        try:
            check_relpath(prefix)
        except UnsafePathError as err:
            raise StorageError(f"prefix of {uri!r} is not a clean path: {err}") from None
    return bucket, prefix


def open_storage(
    root: str | os.PathLike | Storage,
    *,
    cache_dir: str | os.PathLike | None = None,
    endpoint_url: str | None = None,
) -> Storage:
    """The storage for a root given as a local path, ``file://`` URI or ``s3://bucket/prefix``."""
    if isinstance(root, Storage):
        return root
    text = os.fspath(root)
    if text.startswith("s3://"):
        return S3Storage(text, cache_dir=cache_dir, endpoint_url=endpoint_url)
    if text.startswith("file://"):
        return LocalStorage(text[len("file://") :])
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme:
        raise StorageError(
            f"dataset root {text!r} uses the unsupported scheme {scheme.group(1)!r}; "
            "use a local path or s3://bucket/prefix"
        )
    return LocalStorage(text)


def _make_s3_client(endpoint_url: str | None) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as err:  # boto3 is only needed for s3:// roots
        raise StorageError("s3:// dataset roots need boto3; install it with `pip install boto3`") from err
    endpoint = (
        endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )
    style = os.environ.get("SAFT_S3_ADDRESSING_STYLE") or ("path" if endpoint else "auto")
    # Throttling, 5xx answers, resets and refused connections are retried by botocore with
    # exponential backoff and jitter ("standard": up to 20 s between tries); the timeouts
    # bound each try, so an endpoint that is down fails the step in bounded time.
    config = Config(
        s3={"addressing_style": style},
        retries={"total_max_attempts": s3_max_attempts(), "mode": os.environ.get("AWS_RETRY_MODE") or "standard"},
        connect_timeout=_env_seconds(CONNECT_TIMEOUT_ENV, 10.0),
        read_timeout=_env_seconds(READ_TIMEOUT_ENV, 60.0),
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def s3_max_attempts() -> int:
    """Tries per S3 request: ``$SAFT_S3_MAX_ATTEMPTS``, else ``$AWS_MAX_ATTEMPTS``, else 5."""
    for name in (MAX_ATTEMPTS_ENV, "AWS_MAX_ATTEMPTS"):
        text = os.environ.get(name)
        if text:
            try:
                value = int(text)
            except ValueError:
                raise StorageError(f"{name}={text!r} must be a whole number of tries (e.g. 5)") from None
            if value < 1:
                raise StorageError(f"{name}={text!r} must be at least 1")
            return value
    return DEFAULT_MAX_ATTEMPTS


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise StorageError(f"{name}={text!r} must be a number of seconds") from None
    if not value > 0:
        raise StorageError(f"{name}={text!r} must be positive")
    return value


@contextlib.contextmanager
def _s3_errors(location: str) -> Iterator[None]:
    """Turn botocore exceptions into StorageError subclasses that say what to check."""
    from botocore import exceptions as bx

    try:
        yield
    except bx.ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in {"NoSuchKey", "404", "NotFound"}:
            raise ObjectNotFoundError(f"{location} does not exist") from None
        if code == "NoSuchBucket":
            raise StorageError(f"{location}: the bucket does not exist at this endpoint") from None
        if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            raise StorageError(
                f"{location}: access denied ({code}); check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            ) from None
        if code in _TRANSIENT_CODES:
            raise StorageError(
                f"{location}: S3 kept failing ({code}) after {s3_max_attempts()} tries with backoff; the "
                f"service is overloaded or down. Retry the step later, or allow more tries with {MAX_ATTEMPTS_ENV}"
            ) from None
        raise StorageError(f"{location}: S3 request failed: {err}") from None
    except (bx.ChecksumError, bx.FlexibleChecksumError) as err:  # the bytes received are not the bytes S3 holds
        raise StorageError(
            f"{location}: the bytes received do not match the checksum S3 sent for the object ({err}); the transfer "
            "corrupted them or the object changed while it was read. Retry the step; if it persists, upload the "
            "object again"
        ) from None
    except bx.NoCredentialsError:
        raise StorageError(
            f"{location}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        ) from None
    except (bx.ConnectionError, bx.HTTPClientError) as err:  # refused, reset, DNS, connect/read timeout
        raise StorageError(
            f"{location}: cannot reach the S3 endpoint or lost the connection ({err}; requests are tried up "
            f"to {s3_max_attempts()} times with backoff); check that it is up and that AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL point at it (tries: "
            f"{MAX_ATTEMPTS_ENV}; timeouts: {CONNECT_TIMEOUT_ENV}, {READ_TIMEOUT_ENV})"
        ) from None
