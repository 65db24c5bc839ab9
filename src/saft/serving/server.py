"""``saft serve``: the HTTP endpoint of a registered model, as a KServe custom predictor runs it.

Routes: KServe's V2 Open Inference Protocol (health, metadata, inference; request and
response forms in :mod:`saft.serving.protocol_v2`), its V1 prediction protocol
(:mod:`saft.serving.protocol`), and Prometheus metrics (:mod:`saft.serving.metrics`)::

    GET  /v2/health/live                   200 while the process runs (503 once loading failed)
    GET  /v2/health/ready                  200 when loaded, warmed up and not saturated, else 503 + reason
    GET  /v2                               server metadata
    GET  /v2/models/NAME[/versions/V]      model metadata: its input and outputs
    GET  /v2/models/NAME[/versions/V]/ready
    POST /v2/models/NAME[/versions/V]/infer
    GET  /v1/models                        {"models": [NAME]}
    GET  /v1/models/NAME                   {"name", "ready", "version", "classes", "device", "precision", ...}
    POST /v1/models/NAME:predict
    GET  /metrics

NAME defaults to the InferenceService name KServe gives the registered model
(``saft.serving.kserve.service_name``: ``saft_ViT.B`` -> ``saft-vit-b``), so the URL a KServe
user calls exists. The port opens at once and the model loads in the background, so a
liveness probe passes during a long start and readiness tells when requests can be sent.
A model that cannot be loaded (no base weights, a fingerprint mismatch, a device this
machine lacks) is logged with its reason and the process exits with status 3.

A request's body is read with a deadline before it takes a slot, bodies in memory and
decodes are budgeted, and readiness turns 503 while the server is saturated
(:mod:`saft.serving.admission`, :mod:`saft.serving.decode`). Every answer is JSON (the
metrics text aside); an unexpected failure answers 500 ``{"error": "internal error (...)"}``,
logged with its traceback and never sent to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field

from saft.serving.admission import Admission, Busy
from saft.serving.fetch import FetchPolicy
from saft.serving.metrics import CONTENT_TYPE, MeasuredApp, ServerMetrics
from saft.serving.protocol import MiB, Limits, PredictRequest, RequestError, parse_request

log = logging.getLogger("saft.serve")
LOAD_FAILED_EXIT = 3
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ServeConfig:
    model_uri: str
    name: str | None = None  # the NAME in the URLs; default: the InferenceService name of the registered model
    host: str = "127.0.0.1"
    port: int = 8080
    device: str = "auto"
    precision: str = "auto"
    max_batch: int = 32
    max_wait_ms: float = 0.0  # 0: a batch is what queued while the previous one ran
    decode_workers: int = 0  # 0: min(8, CPUs)
    decode_memory_mb: float = 0.0  # 0: a quarter of the memory limit (saft.serving.decode)
    max_concurrent: int = 64  # requests parsed, decoded and classified at once
    max_queue: int = 256  # requests waiting for a slot; one more is refused with 503
    max_buffered_mb: float = 0.0  # request bodies held in memory; 0: 4 x the body limit
    body_timeout_s: float = 30.0
    saturation_s: float = 5.0
    threads: int = 0  # torch intra-op threads; 0: torch's default
    limits: Limits = field(default_factory=Limits)
    policy: FetchPolicy = field(default_factory=FetchPolicy)

    def __post_init__(self):
        if self.name is not None and not NAME_PATTERN.match(self.name):
            raise ValueError(f"--name {self.name!r}: a model name in URLs is letters, digits, '.', '_' and '-'")


def registered_name(model_uri: str) -> str | None:
    """``models:/saft-tiny@champion`` -> ``saft-tiny``; None for any other URI."""
    if model_uri.startswith("models:/"):
        rest = model_uri[len("models:/"):].strip("/")
        return rest.split("@", 1)[0].split("/", 1)[0] or None
    return None


def default_name(model_uri: str) -> str:
    """The InferenceService name of the registered model (``saft_ViT.B`` -> ``saft-vit-b``); ``saft`` otherwise."""
    from saft.serving.kserve import service_name

    name = registered_name(model_uri)
    return service_name(name) if name else "saft"


def _resolve_version(model_uri: str) -> tuple[str, str | None]:
    """``(uri, version)``: an alias resolved to its version now, so what is loaded is what is reported."""
    name = registered_name(model_uri)
    if name is None:
        return model_uri, None
    from mlflow import MlflowClient

    rest = model_uri[len("models:/"):].strip("/")
    if "@" in rest:
        alias = rest.split("@", 1)[1]
        version = str(MlflowClient().get_model_version_by_alias(name, alias).version)
        return f"models:/{name}/{version}", version
    parts = rest.split("/")
    return model_uri, (parts[1] if len(parts) > 1 and parts[1].isdigit() else None)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """``values`` set in os.environ for the block, then restored."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_python_model(model_uri: str, device: str, precision: str):
    """The SAFT python model at ``model_uri`` on ``device`` in ``precision``, or a clear error.

    MLflow hands ``model_config`` to a pyfunc only when the model was logged with one (and
    otherwise drops it with a warning): versions registered before that get the settings
    through ``SAFT_SERVE_DEVICE`` / ``SAFT_SERVE_PRECISION`` instead, set for the load only.
    Either way the loaded classifier is checked: a model on another device or in another
    precision than asked is an error, never a silent fallback.
    """
    import mlflow.artifacts
    import mlflow.pyfunc
    import torch
    from mlflow.models import Model

    from saft.serving.predictor import autocast_dtype, precision_name

    local = mlflow.artifacts.download_artifacts(model_uri)
    settings = {"device": device, "precision": precision}
    accepts = "device" in (Model.load(local).flavors.get("python_function", {}).get("config") or {})
    with _environment({"SAFT_SERVE_DEVICE": device, "SAFT_SERVE_PRECISION": precision}):
        loaded = mlflow.pyfunc.load_model(local, model_config=settings if accepts else None)
    python_model = loaded.unwrap_python_model()
    classifier = getattr(python_model, "classifier", None)
    if classifier is None:
        raise ValueError(f"{model_uri} is not a SAFT model (its python model is {type(python_model).__name__}); "
                         "serve a version registered by `saft register`")
    want = autocast_dtype(torch.device(device), precision)
    if classifier.device != torch.device(device) or classifier.autocast != want:
        raise RuntimeError(f"{model_uri} loaded on {classifier.device} in {precision_name(classifier.autocast)}, "
                           f"not on {device} in {precision_name(want)} as asked: its model ignores the serving "
                           "settings; register it again with this version of saft")
    return python_model


class ServedModel:
    """The loaded model and its serving machinery; ``load`` runs once, in a background thread."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.name = cfg.name or default_name(cfg.model_uri)
        self.version: str | None = None
        self.ready = False
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.device = self.precision = None
        self.classifier = self.pool = self.batcher = None
        self.metrics = ServerMetrics()
        self.admission: Admission | None = None  # set by build_app

    def load(self) -> None:
        from saft.serving.predictor import Batcher, ImagePool, precision_name, serving_device

        start = time.perf_counter()
        device = serving_device(self.cfg.device)
        if self.cfg.threads:
            import torch

            torch.set_num_threads(self.cfg.threads)
        uri, self.version = _resolve_version(self.cfg.model_uri)
        classifier = load_python_model(uri, device, self.cfg.precision).classifier
        budget = int(self.cfg.decode_memory_mb * MiB) or None
        self.pool = ImagePool(classifier.prepare, self.cfg.limits, self.cfg.policy, self.cfg.decode_workers or None,
                              memory_budget=budget)
        self.batcher = Batcher(classifier, self.cfg.max_batch, self.cfg.max_wait_ms / 1000,
                               on_batch=self.metrics.observe_batch)
        classifier.warm_up()
        self.device, self.precision = str(classifier.device), precision_name(classifier.autocast)
        self.classifier = classifier
        self.load_seconds = time.perf_counter() - start
        self.ready = True
        log.info("serving %s (version %s, %d classes on %s, %s) after %.2f s; decode memory budget %.0f MiB",
                 self.name, self.version, classifier.n_classes, self.device, self.precision, self.load_seconds,
                 self.pool.memory_budget / MiB)

    def describe(self) -> dict:
        return {"name": self.name, "ready": self.ready, "version": self.version, "load_seconds": self.load_seconds,
                "classes": self.classifier.n_classes if self.classifier else None, "device": self.device,
                "precision": self.precision, **({"error": self.error} if self.error else {})}

    def _admit(self, body: bytes, json_length: int | None, v2: bool):
        """Parse and validate the request, probe its images, queue them for decoding (in a worker thread)."""
        from saft.serving.protocol_v2 import parse_infer_request

        n = self.classifier.n_classes
        request = (parse_infer_request(body, self.cfg.limits, n, json_length) if v2
                   else parse_request(body, self.cfg.limits, n))
        return request, self.pool.submit(request.images)

    async def _run(self, body: bytes, json_length: int | None, v2: bool) -> tuple[PredictRequest, list]:
        from saft.serving.decode import gather

        request, futures = await asyncio.to_thread(self._admit, body, json_length, v2)
        if futures:
            await asyncio.wait([asyncio.wrap_future(f) for f in futures])
        pixels = gather(futures)
        rows = []
        for future in self.batcher.submit(pixels, request.top_k):
            rows += await asyncio.wrap_future(future)
        return request, rows

    async def predict(self, body: bytes) -> dict:
        """A V1 ``:predict`` answer for ``body``."""
        _, rows = await self._run(body, None, v2=False)
        return {"model_name": self.name, "model_version": self.version, "predictions": rows}

    async def infer(self, body: bytes, json_length: int | None = None) -> dict:
        """A V2 inference response for ``body`` (``json_length``: the binary form's JSON header length)."""
        from saft.serving.protocol_v2 import infer_response

        request, rows = await self._run(body, json_length, v2=True)
        return infer_response(self.name, self.version, request, rows)

    def close(self) -> None:
        if self.batcher:
            self.batcher.close()
        if self.pool:
            self.pool.close()


def _json(status: int, doc: dict, headers: dict | None = None):
    from starlette.responses import Response

    return Response(json.dumps(doc), status_code=status, media_type="application/json", headers=headers)


def _error(exc: RequestError):
    headers = {}
    if isinstance(exc, Busy):
        headers["Retry-After"] = "1"
    if exc.status in (408, 413):
        headers["Connection"] = "close"  # the client may still be sending: do not read on
    return _json(exc.status, {"error": str(exc)}, headers)


def build_app(served: ServedModel):
    """The Starlette application answering the routes of the module docstring."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response
    from starlette.routing import Route

    from saft import __version__
    from saft.serving import protocol_v2

    cfg = served.cfg
    admission = Admission(cfg.max_concurrent, cfg.max_queue,
                          int(cfg.max_buffered_mb * MiB) or 4 * cfg.limits.max_body_bytes, cfg.body_timeout_s,
                          cfg.saturation_s)

    def not_ready() -> str | None:
        if served.error:
            return served.error
        if not served.ready:
            return "the model is still loading"
        return admission.saturation()

    async def live(request):
        if served.error:
            return _json(503, {"live": False, "error": served.error})
        return _json(200, {"live": True})

    async def ready(request):
        why = not_ready()
        return _json(503 if why else 200, {"ready": not why, **({"reason": why} if why else {})})

    def unknown(name: str, version: str | None = None):
        if name != served.name:
            return _json(404, {"error": f"no model {name!r} here; this server serves {served.name!r}"})
        if version is not None and version != served.version:
            return _json(404, {"error": f"{name} version {version} is not served here; this server serves version "
                                        f"{served.version or '(unversioned: leave /versions/... out)'}"})
        return None

    async def answer(request, work) -> Response:
        """Body (deadline, budget), slot, then ``work(body)``; every failure as JSON."""
        if not served.ready:
            return _json(503, {"error": f"{served.error or 'the model is still loading'}; wait for /v2/health/ready"})
        reserved = 0
        try:
            body, reserved = await admission.read_body(request, cfg.limits.max_body_bytes)
            await admission.acquire()
            try:
                return _json(200, await work(body))
            finally:
                admission.release()
        except RequestError as exc:
            return _error(exc)
        except ClientDisconnect:  # gone before its body arrived: nobody to answer, nothing to log
            return Response(status_code=499)
        except Exception as exc:  # never a traceback to the client; the log has it
            log.exception("prediction failed")
            return _json(500, {"error": f"internal error ({type(exc).__name__}); see the server log"})
        finally:
            admission.give_back(reserved)

    async def v1_models(request):
        return _json(200, {"models": [served.name]})

    async def v1_model(request):
        name, _, verb = request.path_params["target"].partition(":")
        if (refused := unknown(name)) is not None:
            return refused
        if request.method == "GET":
            if verb:
                return _json(405, {"error": f"use POST for /v1/models/{name}:{verb}"})
            return _json(200 if served.ready else 503, served.describe())
        if verb != "predict":
            return _json(404, {"error": f"unknown verb {verb!r}: POST /v1/models/{name}:predict"})
        return await answer(request, served.predict)

    async def v2_server(request):
        return _json(200, protocol_v2.server_metadata(__version__))

    async def v2_model(request):
        p = request.path_params
        if (refused := unknown(p["name"], p.get("version"))) is not None:
            return refused
        return _json(200, protocol_v2.model_metadata(served.name, served.version))

    async def v2_model_ready(request):
        p = request.path_params
        if (refused := unknown(p["name"], p.get("version"))) is not None:
            return refused
        why = not_ready()
        return _json(503 if why else 200, {"name": served.name, "ready": not why, **({"reason": why} if why else {})})

    async def v2_infer(request):
        p = request.path_params
        if (refused := unknown(p["name"], p.get("version"))) is not None:
            return refused

        async def work(body: bytes) -> dict:
            length = protocol_v2.header_length(request.headers.get(protocol_v2.HEADER_LENGTH), len(body))
            return await served.infer(body, length)

        return await answer(request, work)

    async def metrics(request):
        gauges = [("saft_ready", "1 when /v2/health/ready answers 200.", {}, 0 if not_ready() else 1),
                  ("saft_requests_in_progress", "Requests holding a slot.", {}, admission.in_progress),
                  ("saft_requests_waiting", "Requests waiting for a slot.", {}, len(admission.waiting)),
                  ("saft_requests_refused_busy", "Requests refused as busy (503) since start.", {},
                   admission.refused_busy),
                  ("saft_request_body_bytes", "Bytes of request bodies held in memory.", {}, admission.buffered)]
        if served.pool is not None:
            gauges += [("saft_decode_memory_reserved_bytes", "Decode memory reserved by images being decoded.", {},
                        served.pool.reserved),
                       ("saft_decode_memory_budget_bytes", "The decode memory budget.", {}, served.pool.memory_budget)]
        if served.ready:
            gauges.append(("saft_model_info", "The served model.", {"model": served.name,
                                                                     "version": served.version or "",
                                                                     "device": served.device,
                                                                     "precision": served.precision}, 1))
        return Response(served.metrics.render(gauges), media_type=CONTENT_TYPE)

    async def http_error(request, exc: HTTPException):
        return _json(exc.status_code, {"error": exc.detail})

    async def server_error(request, exc: Exception):
        log.exception("unhandled error")
        return _json(500, {"error": f"internal error ({type(exc).__name__}); see the server log"})

    versions = "/versions/{version}"
    routes = [Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", v2_server),
              Route("/v1/models", v1_models), Route("/v1/models/{target}", v1_model, methods=["GET", "POST"]),
              Route("/metrics", metrics)]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}" + versions):
        routes += [Route(prefix, v2_model), Route(prefix + "/ready", v2_model_ready),
                   Route(prefix + "/infer", v2_infer, methods=["POST"])]
    served.admission = admission
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    return MeasuredApp(app, served.metrics)


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
