"""Storage roots: local paths and s3:// (against a local moto server), and the blob cache."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest

from saft.data.paths import UnsafePathError, check_relpath
from saft.data.storage import (
    BlobCache,
    ChecksumMismatchError,
    LocalStorage,
    ObjectNotFoundError,
    S3Storage,
    StorageError,
    default_cache_dir,
    open_storage,
    parse_s3_uri,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["a.png", "cls/a.png", "cls/sub/a b.jpg", "é/ü.png", "..x/a..b.png"])
def test_check_relpath_accepts_clean_relative_paths(good: str) -> None:
    assert check_relpath(good) == good


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("", "non-empty"),
        ("/etc/passwd", "absolute"),
        ("C:/x.png", "absolute"),
        ("../x.png", "'..'"),
        ("a/../../x.png", "'..'"),
        ("a/./x.png", "normal form"),
        ("a//x.png", "normal form"),
        ("a/x.png/", "normal form"),
        ("a\\x.png", "backslash"),
    ],
)
def test_check_relpath_rejects_with_reason(bad: str, needle: str) -> None:
    with pytest.raises(UnsafePathError, match=needle):
        check_relpath(bad)


# --- local -----------------------------------------------------------------------------


def test_local_list_read_fetch(image_tree: Path) -> None:
    storage = open_storage(image_tree)
    assert isinstance(storage, LocalStorage)
    files = storage.list_files()
    assert files == sorted(files)
    assert len(files) == 24 and "ant/img00.png" in files
    assert storage.list_files("bee") == [f for f in files if f.startswith("bee/")]
    data = (image_tree / "ant" / "img00.png").read_bytes()
    assert storage.read_bytes("ant/img00.png") == data
    assert storage.open("ant/img00.png").read() == data
    assert storage.fetch("ant/img00.png", sha(data)) == (image_tree / "ant" / "img00.png").resolve()
    assert storage.sha256("ant/img00.png") == sha(data)


def test_local_fetch_detects_changed_file(image_tree: Path) -> None:
    storage = open_storage(image_tree)
    with pytest.raises(ChecksumMismatchError, match=r"ant/img00\.png.*Re-run the prepare step"):
        storage.fetch("ant/img00.png", "0" * 64)


def test_local_missing_file_and_root(image_tree: Path, tmp_path: Path) -> None:
    storage = open_storage(image_tree)
    with pytest.raises(ObjectNotFoundError, match="nope.png"):
        storage.read_bytes("ant/nope.png")
    with pytest.raises(ObjectNotFoundError):
        storage.fetch("ant/nope.png")
    with pytest.raises(StorageError, match="does not exist"):
        open_storage(tmp_path / "absent")


def test_local_refuses_escaping_paths_and_symlinks(image_tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"outside")
    (image_tree / "ant" / "link.png").symlink_to(outside)
    storage = open_storage(image_tree)
    assert "ant/link.png" in storage.list_files()  # listed so validation can report it
    with pytest.raises(UnsafePathError, match="outside the dataset root"):
        storage.read_bytes("ant/link.png")
    with pytest.raises(UnsafePathError, match="outside the dataset root"):
        storage.fetch("ant/link.png")
    with pytest.raises(UnsafePathError):
        storage.read_bytes("../secret.png")
    with pytest.raises(UnsafePathError):
        storage.read_bytes(str(outside))


def test_symlink_inside_root_is_allowed(image_tree: Path) -> None:
    (image_tree / "ant" / "alias.png").symlink_to(image_tree / "bee" / "img00.png")
    storage = open_storage(image_tree)
    assert storage.read_bytes("ant/alias.png") == (image_tree / "bee" / "img00.png").read_bytes()


def test_open_storage_schemes(tmp_path: Path) -> None:
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    s3 = open_storage("s3://bucket/some/prefix/", cache_dir=tmp_path)
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.uri_for("a/b.png") == "s3://bucket/some/prefix/a/b.png"
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        open_storage("gs://bucket/x")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(StorageError, match="no bucket"):
        parse_s3_uri("s3:///prefix")
    with pytest.raises(StorageError, match="not a clean path"):
        parse_s3_uri("s3://bucket/a/../b")


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SAFT_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "saft" / "blobs"


# --- blob cache ------------------------------------------------------------------------


def test_blob_cache_put_get_and_mismatch_leaves_nothing(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache")
    data = b"hello blob"
    path = cache.put(lambda sink: sink.write(data), sha(data), "test://hello")
    assert path == cache.path_for(sha(data)) and path.read_bytes() == data
    assert cache.get(sha(data)) == path
    with pytest.raises(ChecksumMismatchError, match="test://other"):
        cache.put(lambda sink: sink.write(b"other"), sha(data + b"!"), "test://other")
    leftovers = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert leftovers == [sha(data)]  # no partial files, no wrong blob
    path.write_bytes(b"damaged")
    assert cache.get(sha(data)) is None and not path.exists()


def test_blob_cache_failed_writer_leaves_no_partial(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "cache")

    def failing(sink) -> None:
        sink.write(b"half")
        raise ConnectionError("dropped")

    with pytest.raises(ConnectionError):
        cache.put(failing, None, "test://x")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


# --- s3 --------------------------------------------------------------------------------


def test_s3_list_read_fetch(s3_bucket, image_tree: Path, upload, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    upload(client, bucket, image_tree, "datasets/tree")
    client.put_object(Bucket=bucket, Key="datasets/tree/bee/", Body=b"")  # console folder marker
    client.put_object(Bucket=bucket, Key="datasets/other.txt", Body=b"not in root")
    storage = open_storage(f"s3://{bucket}/datasets/tree")
    assert storage.list_files() == LocalStorage(image_tree).list_files()
    assert storage.list_files("cat") == [f"cat/img{i:02d}{'.png' if i % 2 == 0 else '.jpg'}" for i in range(6)]
    data = (image_tree / "cat" / "img03.jpg").read_bytes()
    assert storage.read_bytes("cat/img03.jpg") == data
    fetched = storage.fetch("cat/img03.jpg", sha(data))
    assert fetched.read_bytes() == data
    assert fetched.is_relative_to(Path(os.environ["SAFT_CACHE_DIR"]))
    assert fetched.name == sha(data)
    assert storage.sha256("cat/img03.jpg") == sha(data)


def test_s3_cache_hit_needs_no_request(s3_bucket, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    data = b"cached bytes"
    client.put_object(Bucket=bucket, Key="p/a/x.png", Body=data)
    storage = S3Storage(f"s3://{bucket}/p", cache_dir=tmp_path / "cache")
    first = storage.fetch("a/x.png", sha(data))
    client.delete_object(Bucket=bucket, Key="p/a/x.png")
    assert storage.fetch("a/x.png", sha(data)) == first  # served from the cache
    with pytest.raises(ObjectNotFoundError, match=f"s3://{bucket}/p/a/x.png"):
        storage.fetch("a/x.png")  # without a hash the object must be read


def test_s3_damaged_cache_is_fetched_again(s3_bucket, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    data = b"original bytes"
    client.put_object(Bucket=bucket, Key="a/x.png", Body=data)
    storage = S3Storage(f"s3://{bucket}", cache_dir=tmp_path / "cache")
    path = storage.fetch("a/x.png", sha(data))
    path.write_bytes(b"bit rot")
    again = storage.fetch("a/x.png", sha(data))
    assert again == path and again.read_bytes() == data


def test_s3_changed_object_is_refused(s3_bucket, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="a/x.png", Body=b"new content")
    storage = S3Storage(f"s3://{bucket}", cache_dir=tmp_path / "cache")
    with pytest.raises(ChecksumMismatchError, match=f"s3://{bucket}/a/x.png"):
        storage.fetch("a/x.png", sha(b"old content"))
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_s3_errors_are_explained(s3_bucket, tmp_path: Path) -> None:
    _client, bucket = s3_bucket
    with pytest.raises(ObjectNotFoundError, match="does not exist"):
        S3Storage(f"s3://{bucket}", cache_dir=tmp_path).read_bytes("missing.png")
    with pytest.raises(StorageError, match="bucket does not exist"):
        S3Storage("s3://no-such-bucket-saft", cache_dir=tmp_path).list_files()
    with pytest.raises(UnsafePathError):
        S3Storage(f"s3://{bucket}", cache_dir=tmp_path).fetch("../x.png")


def test_s3_storage_pickles_without_client(s3_bucket, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="k.png", Body=b"abc")
    storage = S3Storage(f"s3://{bucket}", cache_dir=tmp_path / "cache")
    assert storage.read_bytes("k.png") == b"abc"
    clone = pickle.loads(pickle.dumps(storage))
    assert clone._client is None
    assert clone.read_bytes("k.png") == b"abc"


def test_a_checksum_failure_from_s3_is_one_line_naming_the_object(tmp_path: Path) -> None:
    """botocore's response-checksum check fails mid-read: the error names the object and what to do."""
    import os

    from botocore.exceptions import FlexibleChecksumError

    from saft.data.storage import S3Storage, StorageError

    class Body:
        def read(self):
            raise FlexibleChecksumError(error_msg="Expected checksum abc did not match calculated checksum def")

        def iter_chunks(self, size):
            yield b"partial"
            self.read()

    class Client:
        def get_object(self, Bucket, Key):
            return {"Body": Body()}

    storage = S3Storage("s3://bucket/tree", cache_dir=tmp_path / "cache")
    storage._client, storage._client_pid = Client(), os.getpid()
    for call in (lambda: storage.read_bytes("a/1.png"), lambda: storage.fetch("a/1.png")):
        with pytest.raises(StorageError) as err:
            call()
        text = str(err.value)
        assert text.startswith("s3://bucket/tree/a/1.png: the bytes received do not match the checksum") \
            and "upload the object again" in text and "\n" not in text
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.stat().st_size]  # nothing half-kept
