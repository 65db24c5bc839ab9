"""The URL fetch policy: refusals happen before any connection; limits hold while reading.

Only loopback servers are contacted. Private and link-local addresses are checked with
the connect function replaced by one that fails the test, so no packet can leave.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saft.serving.fetch import FetchPolicy, check_url, fetch_url, policy_from_env, refused_range
from saft.serving.protocol import RequestError

PAYLOAD = b"\x89PNG fake image bytes" * 10


class _Images(BaseHTTPRequestHandler):
    connections = 0

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        type(self).connections += 1
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()
        elif self.path == "/missing":
            self.send_response(404)
            self.end_headers()
        elif self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(10 << 20))
            self.end_headers()
        elif self.path == "/chunked":  # no Content-Length: the limit must hold while reading
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(64):
                chunk = b"x" * 4096
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(1.5)
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)


@pytest.fixture(scope="module")
def images():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _no_connection(*args, **kwargs):
    raise AssertionError(f"a connection was attempted: {args}")


LOCAL = FetchPolicy(enabled=True, allow_hosts=("127.0.0.1",), allow_private=True, max_bytes=64 << 10, timeout_s=1.0)


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("10.1.2.3", "private"), ("172.16.0.9", "private"), ("192.168.1.1", "private"), ("fd00::5", "private"),
    ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("100.64.0.1", "not globally routable"),
    ("::ffff:10.0.0.1", "private"), ("8.8.8.8", None), ("2606:4700::1111", None),
])
def test_address_ranges(address, why) -> None:
    assert refused_range(address) == why


def test_urls_are_refused_before_any_connection(images, monkeypatch) -> None:
    _Images.connections = 0
    off = FetchPolicy()
    with pytest.raises(RequestError, match="does not fetch URLs") as err:
        fetch_url(f"http://{images}/a.png", off)
    assert err.value.status == 403
    strict = FetchPolicy(enabled=True, allow_hosts=("127.0.0.1", "localhost", "*.internal.example"))
    for url, needle in ((f"http://{images}/a.png", "127.0.0.1 (loopback)"),
                        ("http://localhost/a.png", "loopback"),
                        ("http://[::1]/a.png", "not in this server's URL allow-list"),
                        ("http://evil.example/a.png", "not in this server's URL allow-list")):
        with pytest.raises(RequestError, match=needle.replace("(", r"\(").replace(")", r"\)")) as err:
            fetch_url(url, strict)
        assert err.value.status == 403
    assert _Images.connections == 0  # the loopback server never saw a request
    for url, needle in (("ftp://127.0.0.1/a.png", "only http and https"), ("http://u:p@127.0.0.1/a", "credentials"),
                        ("http://127.0.0.1:99999/a", "not a valid URL"), ("/relative.png", "only http and https")):
        with pytest.raises(RequestError, match=needle):
            fetch_url(url, strict)
    # private and link-local targets: refused by the check, the connect function is never reached
    cloud = FetchPolicy(enabled=True, allow_hosts=("*",))
    for address in ("169.254.169.254", "10.0.0.8", "192.168.0.1"):
        with pytest.raises(RequestError, match="addresses outside the public internet are refused"):
            fetch_url(f"http://{address}/latest/meta-data", cloud, connect=_no_connection)
    with pytest.raises(ValueError, match="no host is allowed"):
        FetchPolicy(enabled=True)


def test_allowed_urls_are_fetched_within_size_and_time(images) -> None:
    assert fetch_url(f"http://{images}/a.png", LOCAL) == PAYLOAD
    for path, status, needle in (("/redirect", 400, "redirects are not followed"), ("/missing", 400, "HTTP 404"),
                                 ("/big", 413, "10.0 MiB"), ("/chunked", 413, "sent more than"),
                                 ("/slow", 400, "within 1 s")):
        started = time.monotonic()
        with pytest.raises(RequestError, match=needle) as err:
            fetch_url(f"http://{images}{path}", LOCAL)
        assert err.value.status == status
        assert time.monotonic() - started < 1.4  # the slow server is given up on at the deadline


def test_the_checked_address_is_the_one_connected_to(images) -> None:
    seen = []

    def connect(address, timeout):
        import socket

        seen.append(address)
        return socket.create_connection(address, timeout)

    host, port = images.split(":")
    _, _, _, addresses = check_url(f"http://{images}/a.png", LOCAL)
    assert fetch_url(f"http://{images}/a.png", LOCAL, connect=connect) == PAYLOAD
    assert seen == [(addresses[0], int(port))] and addresses == [host]


def test_policy_from_the_environment() -> None:
    assert not policy_from_env({}).enabled
    policy = policy_from_env({"SAFT_SERVE_ALLOW_URLS": "1", "SAFT_SERVE_URL_HOSTS": "a.example, *.b.example"})
    assert policy.enabled and policy.allow_hosts == ("a.example", "*.b.example") and not policy.allow_private
    assert policy.host_allowed("x.b.example") and not policy.host_allowed("b.example.evil")
