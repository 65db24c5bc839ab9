"""``saft serve``: the HTTP endpoint of a registered model, as a KServe custom predictor runs it.

Routes (KServe's V1 prediction protocol, V2 health endpoints)::

    GET  /v2/health/live           200 while the process runs (503 once loading failed)
    GET  /v2/health/ready          200 once the model is loaded and warmed up, else 503
    GET  /v1/models/NAME           {"name", "ready", "version", "classes", "load_seconds"}
    POST /v1/models/NAME:predict   see saft.serving.protocol

The port opens at once and the model loads in the background, so a liveness probe passes
during a long start and readiness tells when requests can be sent. A model that cannot
be loaded (no base weights, a fingerprint mismatch) is logged with its reason and the
process exits with status 3: the pod restarts and its log says why.

Every answer is JSON. Refused requests get their 4xx from ``RequestError``; an unexpected
failure answers 500 ``{"error": "internal error (...)"}``, logged with its traceback on the
server and never sent to the client. Requests wait for a slot beyond ``max_concurrent``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass, field

from saft.serving.fetch import FetchPolicy
from saft.serving.protocol import Limits, RequestError, parse_request

log = logging.getLogger("saft.serve")
LOAD_FAILED_EXIT = 3


@dataclass
class ServeConfig:
    model_uri: str
    name: str | None = None  # the NAME in /v1/models/NAME; default: the registered model's name
    host: str = "127.0.0.1"
    port: int = 8080
    device: str = "auto"
    precision: str = "auto"
    max_batch: int = 32
    max_wait_ms: float = 0.0  # 0: a batch is what queued while the previous one ran
    decode_workers: int = 0  # 0: min(8, CPUs)
    max_concurrent: int = 64
    threads: int = 0  # torch intra-op threads; 0: torch's default
    limits: Limits = field(default_factory=Limits)
    policy: FetchPolicy = field(default_factory=FetchPolicy)


def default_name(model_uri: str) -> str:
    """``models:/saft-tiny@champion`` -> ``saft-tiny``; any other URI -> ``saft``."""
    if model_uri.startswith("models:/"):
        rest = model_uri[len("models:/"):].strip("/")
        return rest.split("@", 1)[0].split("/", 1)[0] or "saft"
    return "saft"


def _version_of(model_uri: str) -> str | None:
    """The registered version a ``models:/`` URI names (aliases resolved), or None."""
    if not model_uri.startswith("models:/"):
        return None
    from mlflow import MlflowClient

    rest = model_uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    parts = rest.split("/")
    return parts[1] if len(parts) > 1 and parts[1].isdigit() else None


class ServedModel:
    """The loaded model and its serving machinery; ``load`` runs once, in a background thread."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.name = cfg.name or default_name(cfg.model_uri)
        self.version: str | None = None
        self.ready = False
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.classifier = self.pool = self.batcher = None

    def load(self) -> None:
        import mlflow.pyfunc

        from saft.serving.predictor import Batcher, ImagePool, serving_device

        start = time.perf_counter()
        if self.cfg.threads:
            import torch

            torch.set_num_threads(self.cfg.threads)
        settings = {"device": serving_device(self.cfg.device), "precision": self.cfg.precision}
        python_model = mlflow.pyfunc.load_model(self.cfg.model_uri, model_config=settings).unwrap_python_model()
        classifier = getattr(python_model, "classifier", None)
        if classifier is None:
            raise ValueError(f"{self.cfg.model_uri} is not a SAFT model (its python model is "
                             f"{type(python_model).__name__}); serve a version registered by `saft register`")
        self.version = _version_of(self.cfg.model_uri)
        self.pool = ImagePool(classifier.prepare, self.cfg.limits, self.cfg.policy, self.cfg.decode_workers or None)
        self.batcher = Batcher(classifier, self.cfg.max_batch, self.cfg.max_wait_ms / 1000)
        classifier.warm_up()
        self.classifier = classifier
        self.load_seconds = time.perf_counter() - start
        self.ready = True
        log.info("serving %s (version %s, %d classes on %s) after %.2f s", self.name, self.version,
                 classifier.n_classes, classifier.device, self.load_seconds)

    def describe(self) -> dict:
        return {"name": self.name, "ready": self.ready, "version": self.version, "load_seconds": self.load_seconds,
                "classes": self.classifier.n_classes if self.classifier else None,
                **({"error": self.error} if self.error else {})}

    async def predict(self, body: bytes) -> dict:
        request = parse_request(body, self.cfg.limits, self.classifier.n_classes)
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(None, self.pool.tensors, request.images)
        predictions = []
        for future in self.batcher.submit(pixels, request.top_k):
            predictions += await asyncio.wrap_future(future)
        return {"model_name": self.name, "model_version": self.version, "predictions": predictions}

    def close(self) -> None:
        if self.batcher:
            self.batcher.close()
        if self.pool:
            self.pool.close()


def _json(status: int, doc: dict):
    from starlette.responses import Response

    return Response(json.dumps(doc), status_code=status, media_type="application/json")


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(f"request body is {int(declared) / 2**20:.1f} MiB, more than the {limit / 2**20:g} MiB "
                           "limit: send fewer images per request", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            chunks = []  # keep nothing; read on (up to a bound) so the client, still sending, gets the answer
            if size > _DRAIN_FACTOR * limit:
                break
            continue
        chunks.append(chunk)
    if size > limit:
        raise RequestError(f"request body is more than the {limit / 2**20:g} MiB limit: send fewer images per "
                           "request", 413)
    return b"".join(chunks)


# An undeclared (chunked) body over the limit is read and discarded up to this many times the
# limit before the 413 goes out: a client that is still sending would otherwise see its connection
# reset instead of the answer. Past it the connection is cut.
_DRAIN_FACTOR = 16


def build_app(served: ServedModel):
    """The Starlette application answering the routes of the module docstring."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    slots = asyncio.Semaphore(served.cfg.max_concurrent)

    async def live(request):
        if served.error:
            return _json(503, {"live": False, "error": served.error})
        return _json(200, {"live": True})

    async def ready(request):
        return _json(200 if served.ready else 503, {"ready": served.ready, **({"error": served.error} if served.error
                                                                               else {})})

    async def model(request):
        target = request.path_params["target"]
        name, _, verb = target.partition(":")
        if name != served.name:
            return _json(404, {"error": f"no model {name!r} here; this server serves {served.name!r}"})
        if request.method == "GET":
            if verb:
                return _json(405, {"error": f"use POST for /v1/models/{name}:{verb}"})
            return _json(200 if served.ready else 503, served.describe())
        if verb != "predict":
            return _json(404, {"error": f"unknown verb {verb!r}: POST /v1/models/{name}:predict"})
        if not served.ready:
            return _json(503, {"error": "the model is still loading; wait for /v2/health/ready"})
        try:
            async with slots:
                body = await _read_body(request, served.cfg.limits.max_body_bytes)
                return _json(200, await served.predict(body))
        except RequestError as exc:
            return _json(exc.status, {"error": str(exc)})
        except Exception as exc:  # never a traceback to the client; the log has it
            log.exception("prediction failed")
            return _json(500, {"error": f"internal error ({type(exc).__name__}); see the server log"})

    async def http_error(request, exc: HTTPException):
        return _json(exc.status_code, {"error": exc.detail})

    async def server_error(request, exc: Exception):
        log.exception("unhandled error")
        return _json(500, {"error": f"internal error ({type(exc).__name__}); see the server log"})

    routes = [Route("/v2/health/live", live), Route("/v2/health/ready", ready),
              Route("/v1/models/{target}", model, methods=["GET", "POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


def serve(cfg: ServeConfig) -> int:
    """Run the server until it is stopped (SIGINT/SIGTERM); returns the process exit status."""
    import uvicorn

    served = ServedModel(cfg)
    server = uvicorn.Server(uvicorn.Config(build_app(served), host=cfg.host, port=cfg.port, log_level="info",
                                           access_log=False, timeout_graceful_shutdown=10))
    status = [0]

    def load() -> None:
        try:
            served.load()
        except Exception as exc:  # the reason goes to the log and the health endpoints, then the process ends
            served.error = f"{type(exc).__name__}: {exc}"
            log.error("cannot serve %s: %s", cfg.model_uri, served.error)
            status[0] = LOAD_FAILED_EXIT
            server.should_exit = True

    threading.Thread(target=load, name="saft-load", daemon=True).start()
    try:
        server.run()
    finally:
        served.close()
    return status[0]
