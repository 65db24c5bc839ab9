"""Transient S3 failures are retried with backoff; a lasting outage fails in bounded time
with a message naming the object and what to check.

A small HTTP proxy in front of the moto endpoint answers the first N requests with an S3
``503 SlowDown`` error and forwards the rest, so the client under test is production's
boto3 code path against a real (local) S3 API.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from services import free_port

from saft.data.storage import S3Storage, StorageError, sha256_bytes

ERROR_XML = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FlakyProxy:
    """Forwards to ``target``; the first ``failures`` requests get a 503 instead."""

    def __init__(self, target: str, failures: int) -> None:
        self.target = urlsplit(target)
        self.failures = failures
        self.seen = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _handle(self) -> None:
                with proxy.lock:
                    proxy.seen += 1
                    fail = proxy.seen <= proxy.failures
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(ERROR_XML)))
                    self.end_headers()
                    self.wfile.write(ERROR_XML)
                    return
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{proxy.target.hostname}:{proxy.target.port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky(s3_bucket, monkeypatch):
    client, bucket = s3_bucket
    data = b"\x89PNG not really, but bytes are bytes" * 100
    client.put_object(Bucket=bucket, Key="ds/cat/1.png", Body=data)
    proxies = []

    def start(failures: int) -> FlakyProxy:
        proxy = FlakyProxy(client.meta.endpoint_url, failures)
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        return proxy

    yield start, bucket, data
    for proxy in proxies:
        proxy.close()


def test_a_short_outage_is_retried(flaky, monkeypatch, tmp_path) -> None:
    start, bucket, data = flaky
    monkeypatch.setenv("SAFT_S3_MAX_ATTEMPTS", "5")
    proxy = start(failures=3)
    storage = S3Storage(f"s3://{bucket}/ds", cache_dir=tmp_path / "cache")
    assert storage.read_bytes("cat/1.png") == data
    assert proxy.seen == 4  # three 503s, then the object
    proxy.seen, proxy.failures = 0, 2
    path = storage.fetch("cat/1.png", sha256_bytes(data))  # the cached download path retries too
    assert path.read_bytes() == data and proxy.seen == 3


def test_a_lasting_5xx_fails_after_the_allowed_tries(flaky, monkeypatch) -> None:
    start, bucket, _ = flaky
    monkeypatch.setenv("SAFT_S3_MAX_ATTEMPTS", "2")
    proxy = start(failures=100)
    storage = S3Storage(f"s3://{bucket}/ds")
    with pytest.raises(StorageError) as caught:
        storage.read_bytes("cat/1.png")
    assert proxy.seen == 2
    text = str(caught.value)
    assert f"s3://{bucket}/ds/cat/1.png" in text and "SlowDown" in text
    assert "after 2 tries" in text and "SAFT_S3_MAX_ATTEMPTS" in text


def test_an_endpoint_that_is_down_fails_in_bounded_time(s3_env, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("SAFT_S3_MAX_ATTEMPTS", "3")
    storage = S3Storage("s3://bucket/ds")
    began = time.monotonic()
    with pytest.raises(StorageError) as caught:
        storage.read_bytes("cat/1.png")
    assert time.monotonic() - began < 20  # 3 tries, backoff of at most 1 + 2 s between them
    text = str(caught.value)
    assert "s3://bucket/ds/cat/1.png" in text and "cannot reach the S3 endpoint" in text
    assert "AWS_ENDPOINT_URL_S3" in text and "up to 3 times" in text


def test_an_endpoint_that_never_answers_times_out(s3_env, monkeypatch) -> None:
    # Accepts connections but never replies (a hung load balancer): the read timeout bounds each try.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{listener.getsockname()[1]}")
        monkeypatch.setenv("SAFT_S3_MAX_ATTEMPTS", "2")
        monkeypatch.setenv("SAFT_S3_READ_TIMEOUT", "0.5")
        began = time.monotonic()
        with pytest.raises(StorageError, match=r"s3://bucket/ds/cat/1\.png: cannot reach the S3 endpoint"):
            S3Storage("s3://bucket/ds").read_bytes("cat/1.png")
        assert time.monotonic() - began < 15
    finally:
        listener.close()


@pytest.mark.parametrize("value", ["zero", "0"])
def test_bad_retry_setting_is_named(s3_env, monkeypatch, value) -> None:
    monkeypatch.setenv("SAFT_S3_MAX_ATTEMPTS", value)
    with pytest.raises(StorageError, match="SAFT_S3_MAX_ATTEMPTS"):
        S3Storage("s3://bucket/ds").read_bytes("cat/1.png")
