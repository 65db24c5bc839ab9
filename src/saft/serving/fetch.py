"""Fetching an image a request names by URL, under a policy that is off by default.

A server that fetches URLs for its clients can be made to reach what only the server can
reach: the cloud metadata endpoint (169.254.169.254), the cluster's internal services,
its own loopback port. So, in this order and before any connection is opened:

1. fetching must be enabled (``saft serve --allow-urls``);
2. the scheme must be http or https, with no credentials in the URL;
3. the host must match the allow-list (``images.example.com``, ``*.example.com``, or ``*``);
4. the name is resolved once, and every address it resolves to must be globally routable
   (loopback, link-local, private, carrier-grade NAT, multicast and reserved ranges are
   refused) unless private addresses are explicitly allowed;
5. the connection goes to the address that was checked (the name is not resolved again,
   so a DNS answer that changes between check and connect cannot redirect it), with the
   Host header and TLS server name of the URL, certificates verified.

Redirects are not followed (the target would escape checks 3 and 4): the error names the
location so the client can send it instead. The answer must be 200, at most ``max_bytes``
(refused from Content-Length before reading, or when the body grows past it) and arrive
within ``timeout_s``: every socket operation has that timeout and no read starts after
it has passed in total, so a fetch ends within twice ``timeout_s`` at worst.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable

from saft.serving.protocol import MiB, RequestError

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class FetchPolicy:
    enabled: bool = False
    allow_hosts: tuple[str, ...] = field(default_factory=tuple)
    allow_private: bool = False
    max_bytes: int = 16 * MiB
    timeout_s: float = 5.0

    def __post_init__(self):
        hosts = tuple(h.strip().lower().rstrip(".") for h in self.allow_hosts if h.strip())
        object.__setattr__(self, "allow_hosts", hosts)
        if self.enabled and not hosts:
            raise ValueError("URL fetching is enabled but no host is allowed: give --url-allow-host HOST "
                             "(repeatable; *.example.com for subdomains, * for any public host)")
        if self.max_bytes < 1 or self.timeout_s <= 0:
            raise ValueError("URL fetching needs a positive size limit and timeout")

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for pattern in self.allow_hosts:
            if pattern == "*" or pattern == host:
                return True
            if pattern.startswith("*.") and host.endswith(pattern[1:]):
                return True
        return False


def refused_range(address: str) -> str | None:
    """Why ``address`` may not be fetched from without ``allow_private``, or None if it is public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for name, hit in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                      ("unspecified", ip.is_unspecified), ("multicast", ip.is_multicast),
                      ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if hit:
            return name
    if not ip.is_global:  # carrier-grade NAT, documentation and benchmarking ranges
        return "not globally routable"
    return None


def _resolve(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise RequestError(f"cannot resolve host {host!r} ({exc})") from None
    addresses = []
    for *_, sockaddr in infos:
        if sockaddr[0] not in addresses:
            addresses.append(sockaddr[0])
    return addresses


class _Pinned:
    """Connect to the checked address instead of resolving the host name again."""

    def __init__(self, address: str, connect: Callable):
        self.address, self.open_socket = address, connect

    def socket_for(self, port: int, timeout: float):
        return self.open_socket((self.address, port), timeout)


class _HTTP(http.client.HTTPConnection):
    def __init__(self, host, port, pin: _Pinned, timeout):
        super().__init__(host, port, timeout=timeout)
        self.pin = pin

    def connect(self):
        self.sock = self.pin.socket_for(self.port, self.timeout)


class _HTTPS(http.client.HTTPSConnection):
    def __init__(self, host, port, pin: _Pinned, timeout):
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.pin = pin

    def connect(self):
        self.sock = self.tls.wrap_socket(self.pin.socket_for(self.port, self.timeout), server_hostname=self.host)


def check_url(url: str, policy: FetchPolicy) -> tuple[urllib.parse.SplitResult, str, int, list[str]]:
    """Checks 1-4 of the module docstring; returns (parts, host, port, addresses) or raises RequestError."""
    if not policy.enabled:
        raise RequestError("this server does not fetch URLs (off by default): send the image bytes as "
                           '{"b64": ...}, or start the server with --allow-urls and --url-allow-host', 403)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RequestError(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise RequestError(f"only http and https URLs are fetched, not {parts.scheme or 'a relative URL'!r}")
    if parts.username is not None or parts.password is not None:
        raise RequestError("URLs with credentials (user:password@) are refused")
    host = parts.hostname
    if not host:
        raise RequestError("the URL has no host")
    if not policy.host_allowed(host):
        raise RequestError(f"host {host!r} is not in this server's URL allow-list", 403)
    port = port or (443 if parts.scheme == "https" else 80)
    addresses = _resolve(host, port)
    if not policy.allow_private:
        for address in addresses:
            why = refused_range(address)
            if why:
                raise RequestError(f"host {host!r} resolves to {address} ({why}): addresses outside the public "
                                   "internet are refused (start the server with --url-allow-private to allow them)",
                                   403)
    return parts, host, port, addresses


def fetch_url(url: str, policy: FetchPolicy, *, connect: Callable = socket.create_connection) -> bytes:
    """The body of ``url`` under ``policy``; every refusal or failure is a RequestError."""
    parts, host, port, addresses = check_url(url, policy)
    deadline = time.monotonic() + policy.timeout_s
    cls = _HTTPS if parts.scheme == "https" else _HTTP
    conn = cls(host, port, _Pinned(addresses[0], connect), policy.timeout_s)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    try:
        conn.request("GET", target, headers={"Accept": "image/*", "User-Agent": "saft-serve"})
        response = conn.getresponse()
        if 300 <= response.status < 400:
            raise RequestError(f"{url} redirects to {response.getheader('Location')!r}; redirects are not followed: "
                               "send the final URL")
        if response.status != 200:
            raise RequestError(f"{url} answered HTTP {response.status} {response.reason}")
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > policy.max_bytes:
            raise RequestError(f"{url} is {int(length) / MiB:.1f} MiB, more than the {policy.max_bytes / MiB:g} MiB "
                               "limit per fetched image", 413)
        chunks, size = [], 0
        while True:
            if time.monotonic() > deadline:
                raise socket.timeout()
            chunk = response.read1(_CHUNK)  # one receive: a trickling server cannot hold a read open
            if not chunk:
                break
            size += len(chunk)
            if size > policy.max_bytes:
                raise RequestError(f"{url} sent more than the {policy.max_bytes / MiB:g} MiB limit per fetched "
                                   "image", 413)
            chunks.append(chunk)
        return b"".join(chunks)
    except RequestError:
        raise
    except (socket.timeout, TimeoutError):
        raise RequestError(f"{url} did not answer completely within {policy.timeout_s:g} s") from None
    except ssl.SSLError as exc:
        raise RequestError(f"TLS with {host} failed ({exc.reason or exc})") from None
    except (OSError, http.client.HTTPException) as exc:
        raise RequestError(f"cannot fetch {url} ({type(exc).__name__}: {exc})") from None
    finally:
        conn.close()


def policy_from_env(environ=None) -> FetchPolicy:
    """The policy of a model served without ``saft serve`` options (``mlflow models serve``, Python).

    ``SAFT_SERVE_ALLOW_URLS=1`` enables fetching, ``SAFT_SERVE_URL_HOSTS`` is the
    comma-separated allow-list, ``SAFT_SERVE_URL_ALLOW_PRIVATE=1`` allows private addresses.
    """
    env = os.environ if environ is None else environ
    on = env.get("SAFT_SERVE_ALLOW_URLS", "").strip().lower() in ("1", "true", "yes", "on")
    hosts = tuple(h for h in env.get("SAFT_SERVE_URL_HOSTS", "").split(",") if h.strip())
    private = env.get("SAFT_SERVE_URL_ALLOW_PRIVATE", "").strip().lower() in ("1", "true", "yes", "on")
    return FetchPolicy(enabled=on, allow_hosts=hosts, allow_private=private)
