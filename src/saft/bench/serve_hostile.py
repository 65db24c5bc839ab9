"""``saft bench serve --hostile``: ``saft serve`` under hostile clients, each figure against its baseline.

Loopback only (127.0.0.1), bounded in count and time; every client stops by itself.

1. **Stalled bodies**: an honest client's latency (``honest`` sequential one-image requests)
   alone, then while ``slow_clients`` clients hold connections that declared a 100 kB body
   and sent 15 bytes of it (then how many of those got their 408 at the body deadline).
2. **Turns**: a one-image request's latency alone, then sent just after a request of 64
   large images (4 MP RGB each) that takes seconds to decode.
3. **Memory**: ``8`` concurrent requests of 2 images of 4 MP 16-bit gray (34 KB each, about
   130 MB each to decode): the server's peak RSS above its RSS at ready, with a 160 MiB
   decode memory budget and with the budget out of the way (two server processes, same run).

The helpers are also what ``tests/serving/test_hostile_clients.py`` asserts bounds on.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

HOST = "127.0.0.1"
STALLED_DECLARED = 100_000
BUDGETED_MB, UNBOUNDED_MB = 160, 100_000


def post(port: int, path: str, body: bytes, timeout: float = 120) -> tuple[int, float]:
    """(status, seconds) of one POST on a fresh connection."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``q`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class StalledClients:
    """``n`` connections that declare a body, send 15 bytes of it and stall; their answers are collected."""

    def __init__(self, port: int, n: int, path: str, patience_s: float = 120):
        self.answers: list[tuple[bytes, float]] = []
        self.started = time.monotonic()
        head = (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {STALLED_DECLARED}\r\n\r\n").encode()
        self._threads = []
        for _ in range(n):
            sock = socket.create_connection((HOST, port), timeout=patience_s)
            sock.sendall(head + b'{"instances": [')
            thread = threading.Thread(target=self._answer, args=(sock,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _answer(self, sock: socket.socket) -> None:
        try:
            line = sock.recv(4096).split(b"\r\n", 1)[0]
        except OSError as exc:
            line = type(exc).__name__.encode()
        finally:
            sock.close()
        self.answers.append((line, time.monotonic() - self.started))

    def wait(self, timeout: float) -> list[tuple[bytes, float]]:
        """The status lines and seconds-after-connect of every answer (within ``timeout``)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return list(self.answers)


def honest_latencies(port: int, path: str, body: bytes, n: int) -> list[float]:
    """Seconds of ``n`` sequential requests on one keep-alive connection; any non-200 raises."""
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    latencies = []
    try:
        for _ in range(n):
            started = time.perf_counter()
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            text = response.read()
            if response.status != 200:
                raise RuntimeError(f"honest request answered {response.status}: {text[:300]!r}")
            latencies.append(time.perf_counter() - started)
    finally:
        conn.close()
    return latencies


def _png(array, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def wide_gray_png(side: int = 2000) -> bytes:
    """A 16-bit gray gradient PNG: tens of KB that decode (load_rgb widens 16-bit data) to ~30 bytes per pixel."""
    import numpy as np

    return _png((np.add.outer(np.arange(side), np.arange(side)) * 8).astype(np.uint16))


def large_rgb_png(side: int = 2000) -> bytes:
    """An RGB gradient PNG of ``side`` x ``side``: small to send, a full decode and resize to serve."""
    import numpy as np

    ramp = (np.add.outer(np.arange(side), np.arange(side)) % 256).astype(np.uint8)
    return _png(np.stack([ramp, ramp.T, 255 - ramp], axis=-1))


def v1_body(files: list[bytes], top_k: int = 1) -> bytes:
    return json.dumps({"instances": [{"b64": base64.b64encode(f).decode()} for f in files],
                       "parameters": {"top_k": top_k}}).encode()


def concurrent_load(port: int, path: str, body: bytes, n: int, pid: int) -> dict:
    """``n`` requests sent at once; statuses, seconds, and the RSS of process ``pid`` sampled every 20 ms."""
    import psutil

    proc = psutil.Process(pid)
    ready_rss, samples, done = proc.memory_info().rss, [], threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(proc.memory_info().rss)
            done.wait(0.02)

    statuses: list = []
    clients = [threading.Thread(target=lambda: statuses.append(post(port, path, body)[0])) for _ in range(n)]
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    started = time.monotonic()
    for client in clients:
        client.start()
    for client in clients:
        client.join(300)
    seconds = time.monotonic() - started
    done.set()
    watcher.join()
    return {"statuses": statuses, "seconds": seconds, "rss_ready_bytes": ready_rss, "rss_peak_bytes": max(samples),
            "rss_growth_bytes": max(samples) - ready_rss}


def _stalled_scenario(port: int, path: str, honest: int, slow: int, body_timeout_s: float) -> dict:
    body = v1_body([large_rgb_png(64)])
    alone = honest_latencies(port, path, body, honest)
    stalled = StalledClients(port, slow, path, patience_s=body_timeout_s + 60)
    time.sleep(0.5)
    beside = honest_latencies(port, path, body, honest)
    answers = stalled.wait(body_timeout_s + 60)
    return {"slow_clients": slow, "honest_requests": honest, "body_timeout_s": body_timeout_s,
            "honest_alone_p50_s": statistics.median(alone), "honest_alone_p99_s": percentile(alone, 0.99),
            "honest_beside_p50_s": statistics.median(beside), "honest_beside_p99_s": percentile(beside, 0.99),
            "slow_answered_408": sum(1 for line, _ in answers if b" 408 " in line),
            "slow_answer_after_s": statistics.median([at for _, at in answers]) if answers else None}


def _turns_scenario(port: int, path: str) -> dict:
    small, big = v1_body([large_rgb_png(64)]), v1_body([large_rgb_png(2000)] * 64)
    alone = statistics.median(post(port, path, small)[1] for _ in range(3))
    result: dict = {}

    def send_big() -> None:
        result["big"] = post(port, path, big, timeout=600)

    thread = threading.Thread(target=send_big)
    thread.start()
    time.sleep(0.5)  # the big request is being decoded
    small_status, beside = post(port, path, small)
    thread.join(600)
    big_status, big_s = result["big"]
    return {"big_images": 64, "big_status": big_status, "big_s": big_s, "small_status": small_status,
            "small_alone_s": alone, "small_beside_big_s": beside}


def run_hostile_benchmark(model_dir: Path, folder: Path, env: dict, server_cls, free_port: Callable[[], int],
                          honest: int = 50, slow: int = 64, body_timeout_s: float = 10.0,
                          progress: Callable[[str], None] = print) -> dict:
    """The three scenarios of the module docstring against ``saft serve`` processes (``server_cls``: bench._Server)."""
    def start(tag: str, *flags: str):
        port = free_port()
        command = [sys.executable, "-m", "saft.cli", "serve", str(model_dir), "--host", HOST, "--port", str(port),
                   "--name", "bench", "--device", "cpu", *flags]
        return server_cls(f"saft serve ({tag})", command, port, "/v2/health/ready", env, folder / f"hostile-{tag}.log")

    path = "/v1/models/bench:predict"
    report = {}
    server = start("defaults", "--body-timeout", str(body_timeout_s))
    try:
        progress(f"stalled bodies: {honest} honest requests alone, then beside {slow} stalled clients ...")
        report["stalled_bodies"] = _stalled_scenario(server.port, path, honest, slow, body_timeout_s)
        progress("turns: a one-image request beside a request of 64 images of 4 MP ...")
        report["turns"] = _turns_scenario(server.port, path)
    finally:
        server.stop()
    body = v1_body([wide_gray_png()] * 2)
    report["memory"] = {}
    for budget in (BUDGETED_MB, UNBOUNDED_MB):
        progress(f"memory: 8 requests of 2 images of 4 MP 16-bit gray, decode memory budget {budget} MiB ...")
        server = start(f"budget-{budget}", "--decode-workers", "4", "--decode-memory-mb", str(budget))
        try:
            time.sleep(0.5)
            report["memory"][str(budget)] = concurrent_load(server.port, path, body, 8, server.process.pid)
        finally:
            server.stop()
    return report


def format_hostile(report: dict) -> str:
    s, t, m = report["stalled_bodies"], report["turns"], report["memory"]
    mib = 2 ** 20
    budgeted, unbounded = m[str(BUDGETED_MB)], m[str(UNBOUNDED_MB)]
    return "\n".join([
        f"stalled bodies: honest p50/p99 {s['honest_alone_p50_s'] * 1e3:.0f}/{s['honest_alone_p99_s'] * 1e3:.0f} ms "
        f"alone, {s['honest_beside_p50_s'] * 1e3:.0f}/{s['honest_beside_p99_s'] * 1e3:.0f} ms beside "
        f"{s['slow_clients']} stalled clients (p99 x{s['honest_beside_p99_s'] / s['honest_alone_p99_s']:.2f}); "
        f"{s['slow_answered_408']}/{s['slow_clients']} stalled got 408 after {s['slow_answer_after_s']:.1f} s",
        f"turns: one image {t['small_alone_s'] * 1e3:.0f} ms alone, {t['small_beside_big_s'] * 1e3:.0f} ms beside "
        f"a request of {t['big_images']} images of 4 MP that took {t['big_s']:.1f} s",
        f"memory: peak RSS +{budgeted['rss_growth_bytes'] / mib:.0f} MiB over ready with a {BUDGETED_MB} MiB decode "
        f"budget, +{unbounded['rss_growth_bytes'] / mib:.0f} MiB without (x"
        f"{unbounded['rss_growth_bytes'] / max(1, budgeted['rss_growth_bytes']):.2f}); "
        f"{budgeted['seconds']:.1f} s vs {unbounded['seconds']:.1f} s for the 8 requests"])
