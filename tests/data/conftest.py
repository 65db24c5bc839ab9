"""Fixtures for the data-layer tests: tiny ImageFolder trees and a local S3 endpoint.

The S3 tests run against a real HTTP endpoint (moto's server) bound to 127.0.0.1 on a
port chosen here, so the boto3 code path is the one production uses; AWS settings are
set per test and restored afterwards, and nothing leaves the loopback interface.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
from PIL import Image

CLASSES = ("ant", "bee", "cat", "dog")
PER_CLASS = 6


def write_image(path: Path, seed: int, fmt: str | None = None, size: tuple[int, int] = (8, 8)) -> Path:
    """A small image whose pixels depend on ``seed``, so different seeds give different bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size)
    image.putdata([((seed * 37 + i) % 256, (seed * 11 + 3 * i) % 256, (seed * 5 + 7 * i) % 256) for i in range(size[0] * size[1])])
    image.save(path, format=fmt)
    return path


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """An ImageFolder root: 4 classes x 6 images, PNG and JPEG mixed, all distinct bytes."""
    root = tmp_path / "tree"
    seed = 0
    for name in CLASSES:
        for i in range(PER_CLASS):
            ext = ".png" if i % 2 == 0 else ".jpg"
            write_image(root / name / f"img{i:02d}{ext}", seed)
            seed += 1
    return root


@pytest.fixture
def make_image() -> Callable[..., Path]:
    return write_image


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1:<free port>, stopped by its pid at session end."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    executable = Path(sys.executable).parent / "moto_server"
    port = _free_port()
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "moto.server"]
    command += ["-H", "127.0.0.1", "-p", str(port)]
    env = {key: value for key, value in os.environ.items() if not key.upper().endswith("_PROXY")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    endpoint = f"http://127.0.0.1:{port}"
    opener = _no_proxy_opener()
    deadline = time.monotonic() + 30
    try:
        while True:
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                pytest.fail(f"moto_server exited with {process.returncode}: {err[-2000:]}")
            try:
                with opener.open(f"{endpoint}/moto-api/", timeout=1):
                    break
            except urllib.error.HTTPError:
                break  # any HTTP answer means the server is up
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer on {endpoint} within 30 s")
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """AWS settings pointing at the local endpoint for one test (restored afterwards)."""
    for key in list(os.environ):
        if key.startswith("AWS_") or key.upper().endswith("_PROXY"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "blob-cache"))
    return moto_endpoint


@pytest.fixture
def s3_bucket(s3_env: str):
    """A fresh bucket on the local endpoint; returns (boto3 client, bucket name)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env)
    name = f"saft-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


def upload_tree(client, bucket: str, root: Path, prefix: str) -> None:
    """Copy a local tree to s3://bucket/prefix/ (relative paths kept)."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(root).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


@pytest.fixture
def upload() -> Callable[..., None]:
    return upload_tree


@pytest.fixture
def copy_tree() -> Callable[[Path, Path], Path]:
    def copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst, symlinks=True)
        return dst

    return copy
