"""``GET /metrics`` of ``saft serve``: Prometheus' text exposition format (version 0.0.4), written here.

A few counters and histograms do not need a client library (and the serving environment one
more dependency). What is exported, with the meaning Prometheus gives each type (a counter
only grows; a histogram's ``_bucket{le="x"}`` counts observations <= x, cumulatively, with
``_sum`` and ``_count``)::

    saft_requests_total{route, code}              requests answered
    saft_request_errors_total{route, code}        of those, the ones answered 4xx or 5xx
    saft_request_duration_seconds{route}          time from the request's arrival to its answer
    saft_batch_size                               images per forward pass of the model
    saft_batch_duration_seconds                   seconds per forward pass (top-k included)
    saft_images_total                             images classified

plus gauges read at scrape time (the server's :func:`gauges`). ``route`` is the route
template (``/v2/models/{name}/infer``), never the raw path, so a client cannot create
unbounded label values.
"""

from __future__ import annotations

import math
import re
import threading
import time
from typing import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) and not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self.values: dict[tuple, float] = {}

    def inc(self, *label_values, by: float = 1) -> None:
        self.values[label_values] = self.values.get(label_values, 0) + by

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for key, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.labels, key)} {_number(value)}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self.buckets = tuple(buckets) + (math.inf,)
        self.series: dict[tuple, list] = {}  # label values -> [bucket counts..., sum, count]

    def observe(self, value: float, *label_values) -> None:
        row = self.series.setdefault(label_values, [0] * len(self.buckets) + [0.0, 0])
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                row[i] += 1  # cumulative: every bucket at or above the value
        row[-2] += value
        row[-1] += 1

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for key, row in sorted(self.series.items()):
            for bound, count in zip(self.buckets, row):
                le = 'le="' + _number(bound) + '"'
                yield f"{self.name}_bucket{_labels(self.labels, key, le)} {count}"
            yield f"{self.name}_sum{_labels(self.labels, key)} {_number(row[-2])}"
            yield f"{self.name}_count{_labels(self.labels, key)} {row[-1]}"


class ServerMetrics:
    """The counters and histograms above; thread-safe (the inference thread records batches)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = Counter("saft_requests_total", "HTTP requests answered, by route template and status code.",
                                ("route", "code"))
        self.errors = Counter("saft_request_errors_total",
                              "HTTP requests answered with a 4xx or 5xx status, by route template and status code.",
                              ("route", "code"))
        self.latency = Histogram("saft_request_duration_seconds",
                                 "Seconds from a request's arrival to the end of its answer, by route template.",
                                 LATENCY_BUCKETS, ("route",))
        self.batch_size = Histogram("saft_batch_size", "Images per forward pass of the model.", BATCH_BUCKETS)
        self.batch_seconds = Histogram("saft_batch_duration_seconds",
                                       "Seconds per forward pass of the model, top-k included.", LATENCY_BUCKETS)
        self.images = Counter("saft_images_total", "Images classified.")

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        with self._lock:
            self.requests.inc(route, str(code))
            if code >= 400:
                self.errors.inc(route, str(code))
            self.latency.observe(seconds, route)

    def observe_batch(self, images: int, seconds: float) -> None:
        with self._lock:
            self.batch_size.observe(images)
            self.batch_seconds.observe(seconds)
            self.images.inc(by=images)

    def render(self, gauges: Iterable[tuple[str, str, dict, float]] = ()) -> str:
        """The exposition text: the metrics above, then ``(name, help, labels, value)`` gauges."""
        with self._lock:
            lines = [line for metric in (self.requests, self.errors, self.latency, self.batch_size,
                                         self.batch_seconds, self.images) for line in metric.lines()]
        seen = set()
        for name, help, labels, value in gauges:
            if name not in seen:
                lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge"]
                seen.add(name)
            lines.append(f"{name}{_labels(tuple(labels), tuple(labels.values()))} {_number(value)}")
        return "\n".join(lines) + "\n"


# Route templates for metric labels: a label must never be the raw path a client chose.
_ROUTES = [(re.compile(p), label) for p, label in (
    (r"/v2/health/live", "/v2/health/live"), (r"/v2/health/ready", "/v2/health/ready"), (r"/v2/?", "/v2"),
    (r"/v2/models/[^/]+(/versions/[^/]+)?", "/v2/models/{name}"),
    (r"/v2/models/[^/]+(/versions/[^/]+)?/ready", "/v2/models/{name}/ready"),
    (r"/v2/models/[^/]+(/versions/[^/]+)?/infer", "/v2/models/{name}/infer"),
    (r"/v1/models", "/v1/models"), (r"/v1/models/[^/:]+", "/v1/models/{name}"),
    (r"/v1/models/[^/:]+:predict", "/v1/models/{name}:predict"), (r"/metrics", "/metrics"))]


def route_of(path: str) -> str:
    for pattern, label in _ROUTES:
        if pattern.fullmatch(path):
            return label
    return "other"


class MeasuredApp:
    """ASGI middleware: every HTTP answer's route, status and duration go to the metrics."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.observe_request(route_of(scope.get("path", "")), status[0], time.perf_counter() - started)
