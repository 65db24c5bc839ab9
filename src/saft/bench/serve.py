"""Serving start-up and load: ``saft serve`` against ``mlflow models serve``, same model, same run.

1. **Start-up** (in this process, the base read from its local store each time): building
   the classifier from the stored head (what serving does now) against encoding the head
   from the text tower at start (what the pyfunc did before the head was stored: the
   legacy path, still used for models registered without a head), for ``classes`` x
   ``templates`` prompts. Then, per server, the time from spawning the process to its
   readiness answer.
2. **Load** (loopback only: both servers bind 127.0.0.1): ``clients`` threads, each on a
   keep-alive connection, send requests of ``images_per_request`` base64 PNGs until
   ``requests`` have been sent or ``duration_s`` has passed, whichever comes first. Per
   server: requests and images per second, p50/p99 latency, errors (anything but a 200),
   and the server's resident memory (its process tree) sampled through the run: at
   readiness, the peak, and the change between the first and the last quarter of the
   samples (what would grow without bound if requests leaked memory). ``protocol`` v2 sends
   ``saft serve`` the V2 binary tensor data form instead of V1's base64 JSON.
3. **Hostile clients** (``hostile``): :mod:`saft.bench.serve_hostile`.

The servers run one after the other on the same machine with the same model folder
(``saft.tracking.pyfunc.build_model_folder``: base stored next to it, head built once).
``mlflow models serve`` is served the same pyfunc with ``--env-manager local`` and one
worker, in its own request format (``dataframe_split``, ``params.top_k``).
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable
from saft.layout import MODEL

HOST = "127.0.0.1"
SERVERS = ("mlflow models serve", "saft serve")  # the baseline first
_NOUNS = ("photo", "sketch", "cartoon", "drawing", "picture", "image")
_ARTICLES = ("a", "the", "an")
_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")


@dataclass
class ServeBenchConfig:
    model: str = "tiny"
    classes: int = 10
    templates: int = 2
    clients: int = 8
    requests: int = 200  # per server
    images_per_request: int = 4
    duration_s: float = 120.0  # per server: the load phase stops here whatever the count
    max_batch: int = 32
    startup_repeats: int = 3
    baseline: bool = True  # also measure `mlflow models serve`
    threads: int = 0  # torch threads of each server (OMP_NUM_THREADS); 0: torch's default
    seed: int = 0
    protocol: str = "v1"  # saft serve's requests: v1 (:predict, base64 JSON) or v2 (/infer, binary tensor data)
    hostile: bool = False  # also run saft.bench.serve_hostile's scenarios

    def __post_init__(self) -> None:
        for name in ("classes", "templates", "clients", "requests", "images_per_request", "startup_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.duration_s <= 0:
            raise ValueError("--duration must be positive")
        if self.protocol not in ("v1", "v2"):
            raise ValueError(f"--protocol must be v1 or v2, got {self.protocol!r}")


def class_names(n: int) -> list[str]:
    """``n`` distinct class names in the embedded model's vocabulary (shapes, then colour + shape, ...)."""
    from saft.data.synth import SHAPES

    names = list(SHAPES)
    combos = [[]]
    while len(names) < n:
        combos = [c + [colour] for c in combos for colour in _COLOURS]
        names += [" ".join(c + [shape]) for c in combos for shape in SHAPES]
    return names[:n]


def templates(n: int) -> list[str]:
    """``n`` distinct prompt templates in the embedded model's vocabulary."""
    made = [f"{a} {noun} of {b} {{}}{end}" for end in (".", "") for a in _ARTICLES for noun in _NOUNS for b in _ARTICLES]
    if n > len(made):
        raise ValueError(f"at most {len(made)} templates can be made from the embedded model's vocabulary")
    return made[:n]


def _rss(pid: int) -> int | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return None


def measure_startup(model_dir: Path, repeats: int) -> dict:
    """Seconds to build the served classifier: stored head vs the head encoded at start (median of repeats)."""
    from saft.serving.bundle import HEAD_FILE, MODEL_REF_FILE, load_classifier, read_reference

    artifacts = model_dir / "artifacts"
    ref = read_reference(artifacts / MODEL_REF_FILE)
    times: dict[str, list[float]] = {"stored_head": [], "encode_at_start": []}
    for _ in range(repeats):
        for key, head in (("stored_head", artifacts / HEAD_FILE), ("encode_at_start", None)):
            started = time.perf_counter()
            load_classifier(ref if head else {**ref, "head": None}, artifacts / MODEL.delta, head,
                            device="cpu")
            times[key].append(time.perf_counter() - started)
    stored, encoded = (statistics.median(times[k]) for k in ("stored_head", "encode_at_start"))
    return {"stored_head_s": stored, "encode_at_start_s": encoded, "speedup": encoded / stored,
            "runs": times, "classes": len(ref["classes"]), "templates": len(ref["templates"])}


class _Server:
    """A server process on 127.0.0.1, ready when ``ready_path`` answers 200; stopped by its pid."""

    def __init__(self, name: str, command: list[str], port: int, ready_path: str, env: dict, log: Path,
                 timeout_s: float = 600):
        self.name, self.port = name, port
        self._log = open(log, "wb")
        started = time.perf_counter()
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"{name} exited with {self.process.returncode}: "
                                   f"{log.read_text(errors='replace')[-2000:]}")
            try:
                if _request(port, "GET", ready_path, None, timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} was not ready within {timeout_s:.0f} s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        self.ready_s = time.perf_counter() - started

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        try:
            os.killpg(self.process.pid, 9)  # anything it forked (mlflow runs uvicorn in a child)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


def _request(port: int, method: str, path: str, body: bytes | None, timeout: float = 60,
             conn: http.client.HTTPConnection | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        if headers is None:
            headers = {"Content-Type": "application/json"} if body else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def _load(server: _Server, path: str, payload: tuple[bytes, dict | None], cfg: ServeBenchConfig) -> dict:
    """Send the bounded load (``payload``: body and headers); latency per request, errors, memory samples."""
    body, headers = payload
    for _ in range(2):  # warm-up, not timed
        _request(server.port, "POST", path, body, headers=headers)
    lock = threading.Lock()
    sent = [0]
    latencies, errors, samples = [], [], []
    deadline = time.monotonic() + cfg.duration_s
    done = threading.Event()

    def client() -> None:
        conn = http.client.HTTPConnection(HOST, server.port, timeout=120)
        try:
            while time.monotonic() < deadline:
                with lock:
                    if sent[0] >= cfg.requests:
                        return
                    sent[0] += 1
                started = time.perf_counter()
                try:
                    status, _ = _request(server.port, "POST", path, body, conn=conn, headers=headers)
                except (OSError, http.client.HTTPException) as exc:
                    status = f"{type(exc).__name__}"
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, server.port, timeout=120)
                elapsed = time.perf_counter() - started
                with lock:
                    (latencies if status == 200 else errors).append(elapsed if status == 200 else str(status))
        finally:
            conn.close()

    def sample() -> None:
        while not done.is_set():
            rss = _rss(server.process.pid)
            if rss:
                samples.append(rss)
            done.wait(0.25)

    rss_ready = _rss(server.process.pid)
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(cfg.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    done.set()
    watcher.join()
    ok = sorted(latencies)
    quarter = max(1, len(samples) // 4)

    def pct(q: float) -> float | None:
        return ok[min(len(ok) - 1, int(round(q * (len(ok) - 1))))] if ok else None

    return {"ready_s": server.ready_s, "requests": len(ok) + len(errors), "errors": len(errors),
            "error_kinds": sorted(set(errors))[:5], "seconds": wall, "requests_per_s": len(ok) / wall,
            "images_per_s": len(ok) * cfg.images_per_request / wall, "p50_s": pct(0.5), "p99_s": pct(0.99),
            "rss_ready_bytes": rss_ready, "rss_peak_bytes": max(samples) if samples else None,
            "rss_growth_bytes": (statistics.median(samples[-quarter:]) - statistics.median(samples[:quarter]))
            if samples else None, "rss_samples": len(samples)}


def _payloads(cfg: ServeBenchConfig) -> dict[str, tuple[bytes, dict | None]]:
    """Per server, the request body and headers: the same images and k in each server's own format."""
    import base64
    import io
    import struct

    from saft.data.synth import SHAPES, render

    files = []
    for i in range(cfg.images_per_request):
        buf = io.BytesIO()
        render("photo", SHAPES[i % len(SHAPES)], 50_000 + i, cfg.seed).image.save(buf, format="PNG")
        files.append(buf.getvalue())
    encoded = [base64.b64encode(f).decode() for f in files]
    k = min(5, cfg.classes)
    mlflow = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in encoded]}, "params": {"top_k": k}}
    if cfg.protocol == "v2":  # the binary tensor data form, as KServe's Python client sends BYTES by default
        tensor = b"".join(struct.pack("<I", len(f)) + f for f in files)
        head = json.dumps({"inputs": [{"name": "image", "shape": [len(files)], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": len(tensor)}}],
                           "parameters": {"top_k": k}}, separators=(",", ":")).encode()
        saft = (head + tensor, {"Content-Type": "application/octet-stream",
                                "Inference-Header-Content-Length": str(len(head))})
    else:
        saft = (json.dumps({"instances": [{"b64": b} for b in encoded], "parameters": {"top_k": k}}).encode(), None)
    return {"saft serve": saft, "mlflow models serve": (json.dumps(mlflow).encode(), None)}


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _commands(name: str, model_dir: Path, port: int, cfg: ServeBenchConfig) -> tuple[list[str], str, str]:
    """(command, readiness path, prediction path) of a server."""
    bin_dir = Path(sys.executable).parent
    if name == "saft serve":
        return ([sys.executable, "-m", "saft.cli", "serve", str(model_dir), "--host", HOST, "--port", str(port),
                 "--name", "bench", "--device", "cpu", "--max-batch", str(cfg.max_batch)],
                "/v2/health/ready", "/v2/models/bench/infer" if cfg.protocol == "v2" else "/v1/models/bench:predict")
    return ([str(bin_dir / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager", "local", "-h", HOST,
             "-p", str(port), "-w", "1"], "/ping", "/invocations")


def run_serve_benchmark(cfg: ServeBenchConfig, progress: Callable[[str], None] = print) -> dict:
    """Start-up and load figures of both servers; see the module docstring."""
    import torch

    from saft.tracking.pyfunc import build_model_folder

    with tempfile.TemporaryDirectory(prefix="saft-bench-serve-") as tmp:
        folder = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        env.update(SAFT_CACHE_DIR=str(folder / "cache"), NO_PROXY="127.0.0.1,localhost",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        if cfg.threads:
            env["OMP_NUM_THREADS"] = str(cfg.threads)
        progress(f"building the served model: {cfg.model}, {cfg.classes} classes x {cfg.templates} templates ...")
        previous = os.environ.get("SAFT_CACHE_DIR")
        os.environ["SAFT_CACHE_DIR"] = env["SAFT_CACHE_DIR"]  # head and base caches of this run only
        try:
            model_dir = build_model_folder(folder, base_model=cfg.model, classes=class_names(cfg.classes),
                                           templates=templates(cfg.templates), method="zeroshot")
            progress(f"start-up: stored head vs head encoded at start, {cfg.startup_repeats} runs each ...")
            startup = measure_startup(model_dir, cfg.startup_repeats)
        finally:
            if previous is None:
                os.environ.pop("SAFT_CACHE_DIR", None)
            else:
                os.environ["SAFT_CACHE_DIR"] = previous
        payloads = _payloads(cfg)
        servers = {}
        for name in SERVERS if cfg.baseline else SERVERS[1:]:
            port = _free_port()
            command, ready, predict = _commands(name, model_dir, port, cfg)
            progress(f"{name}: starting on {HOST}:{port} ...")
            server = _Server(name, command, port, ready, env, folder / f"{name.split()[0]}.log")
            try:
                progress(f"{name}: ready after {server.ready_s:.1f} s; {cfg.requests} requests of "
                         f"{cfg.images_per_request} images from {cfg.clients} clients (at most {cfg.duration_s:g} s)")
                servers[name] = _load(server, predict, payloads[name], cfg)
            finally:
                server.stop()
        hostile = None
        if cfg.hostile:
            from saft.bench.serve_hostile import run_hostile_benchmark

            hostile = run_hostile_benchmark(model_dir, folder, env, _Server, _free_port, progress=progress)
    base, ours = servers.get(SERVERS[0]), servers[SERVERS[1]]

    def ratio(key: str, invert: bool = False) -> float | None:
        if not base or not base.get(key) or not ours.get(key):
            return None
        return base[key] / ours[key] if invert else ours[key] / base[key]

    return {"config": asdict(cfg), "startup": startup, "servers": servers, "hostile": hostile,
            "ratios_saft_vs_mlflow": {"images_per_s": ratio("images_per_s"), "p50_speedup": ratio("p50_s", True),
                                      "p99_speedup": ratio("p99_s", True), "ready_speedup": ratio("ready_s", True)},
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "torch_threads_default": torch.get_num_threads()}}


def format_serve_benchmark(report: dict) -> str:
    cfg, st = report["config"], report["startup"]
    mib = 2 ** 20

    def num(value, fmt: str, scale: float = 1.0) -> str:
        return "n/a" if value is None else format(value / scale, fmt)

    lines = [f"model {cfg['model']}: {st['classes']} classes x {st['templates']} templates; "
             f"{cfg['clients']} clients, {cfg['images_per_request']} images per request, max batch {cfg['max_batch']}",
             f"start-up (classifier built in-process, median of {cfg['startup_repeats']}): stored head "
             f"{st['stored_head_s']:.2f} s, head encoded at start {st['encode_at_start_s']:.2f} s "
             f"({st['speedup']:.1f}x)",
             f"{'server':<21}{'ready s':>8}{'req':>6}{'err':>5}{'req/s':>8}{'img/s':>8}{'p50 ms':>8}{'p99 ms':>8}"
             f"{'RSS MB':>8}{'peak MB':>9}{'growth MB':>10}"]
    for name, r in report["servers"].items():
        lines.append(f"{name:<21}{r['ready_s']:>8.1f}{r['requests']:>6}{r['errors']:>5}{r['requests_per_s']:>8.1f}"
                     f"{r['images_per_s']:>8.1f}{num(r['p50_s'], '.0f', 1e-3):>8}{num(r['p99_s'], '.0f', 1e-3):>8}"
                     f"{num(r['rss_ready_bytes'], '.0f', mib):>8}{num(r['rss_peak_bytes'], '.0f', mib):>9}"
                     f"{num(r['rss_growth_bytes'], '+.1f', mib):>10}")
    q = report["ratios_saft_vs_mlflow"]
    if q["images_per_s"] is not None:
        lines.append(f"saft serve vs mlflow models serve: images/s x{q['images_per_s']:.2f}, p50 x{q['p50_speedup']:.2f} "
                     f"faster, p99 x{q['p99_speedup']:.2f} faster, ready x{q['ready_speedup']:.2f} sooner")
    if report.get("hostile"):
        from saft.bench.serve_hostile import format_hostile

        lines.append(format_hostile(report["hostile"]))
    return "\n".join(lines)
