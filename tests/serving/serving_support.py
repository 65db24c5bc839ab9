"""Helpers shared by the serving tests (conftest.py holds only fixtures; see tracking_support.py for why)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from services import free_port

CLASSES = ["circle", "square", "triangle", "star", "ring"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
ALPHA = 0.5


def encoded(image, fmt: str = "PNG") -> str:
    """``image`` saved as ``fmt``, base64 text."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def shape_images(n: int = 4):
    from saft.data.synth import render
    from saft.world.task import WORLD_SEED

    return [render("photo", CLASSES[i % len(CLASSES)], 40_000 + i, WORLD_SEED).image for i in range(n)]


def small_delta(base, path: Path) -> Path:
    """A sparse delta on a few weights of both towers, so neither the features nor the head are the base's."""
    import torch

    from saft.sparse import Delta

    gen = torch.Generator().manual_seed(3)
    params = dict(base.model.named_parameters())
    names = [n for n in params if n.startswith("visual.") and params[n].ndim == 2][:2]
    names += [n for n in params if n.startswith("transformer.") and params[n].ndim == 2][:2]
    indices = {n: torch.randperm(params[n].numel(), generator=gen)[:50] for n in names}
    values = {n: 0.05 * torch.randn(50, generator=gen) for n in names}
    return Delta(values, indices, base.fingerprint, {"method": "saft", "base_model": "tiny"}).save(path)


@dataclass
class Reply:
    status: int
    body: dict


def _open(request) -> Reply:
    """The status and JSON body of a request, 4xx/5xx answers included (no proxy for loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as response:
            return Reply(response.status, json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, json.loads(exc.read()))


def post(url: str, payload, *, raw=None, headers: dict | None = None) -> Reply:
    data = raw if raw is not None else json.dumps(payload).encode()
    return _open(urllib.request.Request(url, data=data, method="POST",
                                        headers={"Content-Type": "application/json", **(headers or {})}))


def get(url: str) -> Reply:
    return _open(url)


class InProcessServer:
    """``build_app`` served by uvicorn in a thread; ``load`` False leaves the model unloaded.

    ``reuse``: a running InProcessServer whose loaded model this one serves with ``cfg``'s
    admission settings and limits (its decode pool and batcher stay as they were loaded), until
    :meth:`stop`.
    """

    def __init__(self, cfg, load: bool = True, reuse: "InProcessServer | None" = None):
        import uvicorn

        from saft.serving.server import ServedModel, build_app

        self._reused_cfg = None
        if reuse is not None:
            self.served = reuse.served
            self._reused_cfg, self.served.cfg = self.served.cfg, cfg
            self._reused_admission = self.served.admission
        else:
            self.served = ServedModel(cfg)
            if load:
                self.served.load()
        self._owns_model = reuse is None
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.served), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def predict_url(self, name: str | None = None) -> str:
        return f"{self.url}/v1/models/{name or self.served.name}:predict"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        if self._owns_model:
            self.served.close()
        else:
            # build_app has read them already; the reused server keeps its own
            self.served.cfg, self.served.admission = self._reused_cfg, self._reused_admission


