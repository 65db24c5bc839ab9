"""The bounded blob cache: SAFT_CACHE_MAX_GB, least-recently-used eviction, races with other
processes, files that are not blobs, and scans that stream instead of caching."""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from pathlib import Path

import pytest

from saft.data.blob_cache import LOW_WATER, MAX_GB_ENV, BlobCache, cache_max_bytes
from saft.cli.data import main as data_main
from saft.data.storage import S3Storage, StorageError
from saft.data.validate import validate_dataset

BLOB = 1000  # bytes per test object; bounds below are a handful of them


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (BLOB // 32) + bytes(BLOB % 32)


def age(path: Path, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    os.utime(path, (when, when))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 50 * 10**9), ("", 50 * 10**9), ("none", None), ("None", None), ("0", None), ("0.5", 5 * 10**8),
     (" 20 ", 20 * 10**9)],
)
def test_bound_from_the_environment(monkeypatch: pytest.MonkeyPatch, value, expected) -> None:
    if value is None:
        monkeypatch.delenv(MAX_GB_ENV, raising=False)
    else:
        monkeypatch.setenv(MAX_GB_ENV, value)
    assert cache_max_bytes() == expected


@pytest.mark.parametrize("value", ["lots", "-1", "inf", "nan", "10GB"])
def test_bad_bound_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str) -> None:
    monkeypatch.setenv(MAX_GB_ENV, value)
    with pytest.raises(StorageError, match=rf"SAFT_CACHE_MAX_GB='{value}' must be the blob cache's bound in GB.*'none'"):
        S3Storage("s3://bucket/prefix", cache_dir=tmp_path)


def test_cache_stays_under_its_bound_while_reading_more(s3_bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    client, bucket = s3_bucket
    monkeypatch.setenv(MAX_GB_ENV, str(8 * BLOB / 1e9))  # room for 8 objects; 30 are read
    for i in range(30):
        client.put_object(Bucket=bucket, Key=f"d/{i}.bin", Body=payload(i))
    storage = S3Storage(f"s3://{bucket}/d")
    assert storage.cache.max_bytes == 8 * BLOB
    for i in range(30):
        path = storage.fetch(f"{i}.bin", sha(payload(i)))
        assert path.read_bytes() == payload(i)  # the blob just fetched is never the one evicted
        assert storage.cache.usage() <= 8 * BLOB
    held = {blob.path.name for blob in storage.cache.scan()}
    assert sha(payload(29)) in held and sha(payload(0)) not in held
    assert int(8 * BLOB * LOW_WATER) - BLOB < storage.cache.usage() <= 8 * BLOB


def test_a_recently_read_blob_survives_eviction(s3_bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    client, bucket = s3_bucket
    monkeypatch.setenv(MAX_GB_ENV, str(10 * BLOB / 1e9))
    for i in range(12):
        client.put_object(Bucket=bucket, Key=f"{i}.bin", Body=payload(i))
    storage = S3Storage(f"s3://{bucket}")
    paths = [storage.fetch(f"{i}.bin", sha(payload(i))) for i in range(8)]
    for i, path in enumerate(paths):  # fetched minutes apart, oldest first
        age(path, 600 - 60 * i)
    # A hit refreshes the modification time (access times are unreliable under noatime).
    assert storage.fetch("0.bin", sha(payload(0))) == paths[0]
    assert paths[0].stat().st_mtime > time.time() - 60
    # Another process (a DataLoader worker) reads blob 1 through its own copy of the storage.
    worker = pickle.loads(pickle.dumps(storage))
    assert worker.fetch("1.bin", sha(payload(1))) == paths[1]
    for i in range(8, 12):  # 12 blobs > the bound of 10: the least recently used go
        storage.fetch(f"{i}.bin", sha(payload(i)))
    held = {blob.path.name for blob in storage.cache.scan()}
    assert {sha(payload(0)), sha(payload(1))} <= held  # read recently, by this process and by the other
    assert sha(payload(2)) not in held  # the oldest one nobody read again
    assert storage.cache.usage() <= 10 * BLOB


def _fill(cache: BlobCache, first: int, count: int, oldest: float = 1000) -> list[Path]:
    """``count`` blobs written a second apart, the first ``oldest`` seconds ago."""
    paths = [cache.put_bytes(payload(i), f"test://{i}") for i in range(first, first + count)]
    for n, path in enumerate(paths):
        age(path, oldest - n)
    return paths


def test_only_blobs_are_counted_or_deleted(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, max_bytes=5 * BLOB)
    big = b"x" * (20 * BLOB)  # each far beyond the bound: counted, they would empty the cache
    strangers = [
        tmp_path / ".partial-abc123",  # another writer's download in progress
        tmp_path / "heads" / "0123abcd.safetensors",  # the evaluation head cache shares SAFT_CACHE_DIR
        tmp_path / "ab" / "notes.txt",
        tmp_path / "zz" / ("zz" + "0" * 62),  # not a hex prefix
        tmp_path / "ab" / ("cd" + "0" * 62),  # prefix does not match the name
        tmp_path / "README",
    ]
    for path in strangers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(big)
    (tmp_path / "cd").mkdir()
    (tmp_path / "cd" / ("cd" + "1" * 62)).mkdir()  # a folder named like a blob
    _fill(cache, 0, 4)
    assert cache.usage() == 4 * BLOB  # strangers not counted
    cache.put_bytes(payload(10), "test://10")
    cache.put_bytes(payload(11), "test://11")  # 6 blobs > 5: evict down to 4.5
    assert cache.usage() <= int(5 * BLOB * LOW_WATER)
    assert all(path.read_bytes() == big for path in strangers)
    assert (tmp_path / "cd" / ("cd" + "1" * 62)).is_dir()


def test_eviction_races_with_other_processes_are_harmless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = BlobCache(tmp_path, max_bytes=6 * BLOB)
    paths = _fill(cache, 0, 5)
    other = BlobCache(tmp_path, max_bytes=100 * BLOB)  # another process on the same folder
    other_paths = _fill(other, 100, 3, oldest=500)  # this process's tally does not know these yet
    real_scan = BlobCache.scan

    def scan_then_others_act(self: BlobCache):
        blobs = real_scan(self)
        paths[0].unlink()  # another process evicted it after our scan listed it
        paths[1].unlink()
        os.utime(paths[2])  # and another one read this one after the scan
        return blobs

    monkeypatch.setattr(BlobCache, "scan", scan_then_others_act)
    freed = cache.evict()  # must neither fail on the missing files nor delete the one just read
    monkeypatch.setattr(BlobCache, "scan", real_scan)
    assert freed >= 2 * BLOB
    assert paths[2].exists()
    assert cache.usage() <= int(6 * BLOB * LOW_WATER)  # the other process's blobs were counted too
    assert any(path.exists() for path in other_paths)
    # The tally follows what is on disk after the eviction, and later writes evict again.
    for i in range(200, 210):
        cache.put_bytes(payload(i), f"test://{i}")
        assert cache.usage() <= 6 * BLOB
    clone = pickle.loads(pickle.dumps(cache))  # DataLoader workers get a copy without locks or tally
    assert clone.max_bytes == 6 * BLOB and clone.get(sha(payload(209))) is not None


def test_processes_filling_one_cache_together_stay_near_the_bound(tmp_path: Path) -> None:
    # Two processes start on an empty folder; neither one's own writes alone reach the bound.
    first, second = BlobCache(tmp_path, max_bytes=10 * BLOB), BlobCache(tmp_path, max_bytes=10 * BLOB)
    for i in range(0, 60, 2):
        first.put_bytes(payload(i), f"test://{i}")
        second.put_bytes(payload(i + 1), f"test://{i + 1}")
        assert first.usage() <= 10 * BLOB * (1 + 2 * (1 - LOW_WATER))  # one margin per writer at most


def test_a_blob_larger_than_the_bound_is_still_served(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, max_bytes=5 * BLOB)
    _fill(cache, 0, 3)
    huge = b"h" * (20 * BLOB)
    path = cache.put_bytes(huge, "test://huge")  # everything else goes, the blob being written stays
    assert path.read_bytes() == huge and [blob.path for blob in cache.scan()] == [path]


def test_unbounded_cache_never_evicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_GB_ENV, "none")
    cache = BlobCache(tmp_path)
    assert cache.max_bytes is None
    _fill(cache, 0, 20)
    assert cache.evict() == 0 and len(cache.scan()) == 20


def test_validate_streams_without_caching(s3_bucket, image_tree: Path, upload, capsys) -> None:
    client, bucket = s3_bucket
    upload(client, bucket, image_tree, "tree")
    check = validate_dataset(f"s3://{bucket}/tree")
    assert check.report.ok and check.report.files_checked == 24
    assert data_main(["data", "validate", f"s3://{bucket}/tree"]) == 0
    assert "24 file(s), 4 class(es): OK" in capsys.readouterr().out
    cache_dir = Path(os.environ["SAFT_CACHE_DIR"])
    assert not cache_dir.exists() or not any(cache_dir.rglob("*"))
