"""Real local services for tests: processes bound to 127.0.0.1, stopped by their own pid.

``Service`` starts a command, waits until an HTTP URL answers (any status counts as up)
and terminates exactly the process it started. Proxy variables are dropped from the
child's environment so loopback traffic never goes through a proxy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def no_proxy_env(extra: dict | None = None) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.upper().endswith("_PROXY")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra or {})
    return env


def venv_executable(name: str) -> str | None:
    """A console script installed next to the running interpreter, if any."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else None


class ServiceError(RuntimeError):
    pass


class Service:
    """One background process answering HTTP on ``url``."""

    def __init__(self, name: str, command: list[str], url: str, *, env: dict | None = None,
                 log_path: Path | None = None, timeout: float = 60.0):
        self.name, self.url = name, url
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.log_path = log_path
        self.process = subprocess.Popen(command, env=no_proxy_env(env), stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _tail(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def _wait(self, timeout: float) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServiceError(f"{self.name} exited with {self.process.returncode}: {self._tail()}")
            try:
                with opener.open(self.url, timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer means the server is up
            except OSError:
                if time.monotonic() > deadline:
                    raise ServiceError(f"{self.name} did not answer on {self.url} within {timeout:.0f} s: "
                                       f"{self._tail()}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        """Terminate the process this object started (by pid), then kill it if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def start_moto(log_path: Path | None = None) -> Service:
    port = free_port()
    exe = venv_executable("moto_server")
    command = [exe] if exe else [sys.executable, "-m", "moto.server"]
    return Service("moto_server", command + ["-H", "127.0.0.1", "-p", str(port)],
                   f"http://127.0.0.1:{port}/moto-api/", log_path=log_path, timeout=30)
