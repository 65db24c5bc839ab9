"""What a client sends the served model, what it gets back, and every way a request is refused.

Request (JSON, the KServe V1 ``instances`` form; binary data as ``b64`` like TF Serving)::

    {"instances": [{"b64": "<base64 PNG/JPEG/...>"}, {"url": "https://images.example.com/a.jpg"}],
     "parameters": {"top_k": 3}}

Response::

    {"model_name": "saft-tiny", "model_version": "4",
     "predictions": [{"labels": ["star", "ring", "cross"], "probabilities": [0.83, 0.09, 0.03]}, ...]}

A refused request gets ``{"error": "<what is wrong, naming the instance or field>"}`` with a
4xx status and never a stack trace: 400 for malformed JSON, unknown fields, bad base64,
undecodable images and bad parameters; 403 for a URL the fetch policy refuses; 413 for a
body, an image or a batch over the limits. Everything is checked before any image is
decoded, so a bad request costs no inference.

JSON of any shape is refused with a 400, never a 500 and never a large allocation: a body
is parsed only if it holds at most :func:`max_json_values` objects, arrays and separators
(a JSON document can otherwise turn 64 MiB into gigabytes of Python objects, e.g. a list of
millions of ``{}``), integers have at most 19 digits (Python refuses to convert 4300 and
more, with a ValueError), and nesting too deep for the parser is a 400 as well.

The V2 Open Inference Protocol's request and response forms are in
:mod:`saft.serving.protocol_v2`; both reach the same :class:`PredictRequest`.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

REQUEST_FIELDS = ("instances", "parameters")
INSTANCE_FIELDS = ("b64", "url")
PARAMETER_FIELDS = ("top_k",)
DEFAULT_TOP_K = 5
MiB = 1 << 20


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Bounds on one request; each has a ``saft serve`` option of the same name."""

    max_body_bytes: int = 64 * MiB
    max_instances: int = 64
    max_image_bytes: int = 16 * MiB
    max_image_pixels: int = 40_000_000  # e.g. 8000 x 5000; decoding more could exhaust memory
    max_request_pixels: int = 256_000_000  # all images of one request: 64 of 4 MP, or 6 at the image limit

    def __post_init__(self):
        for name in ("max_body_bytes", "max_instances", "max_image_bytes", "max_image_pixels", "max_request_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"serving limit {name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ImageInput:
    """One instance: its position in the request and either decoded bytes or a URL to fetch."""

    index: int
    data: bytes | None = None
    url: str | None = None


@dataclass(frozen=True)
class PredictRequest:
    images: list[ImageInput]
    top_k: int
    request_id: str | None = None  # V2: echoed in the response
    outputs: tuple[str, ...] = ()  # V2: the outputs asked for (all when empty)


MAX_INT_DIGITS = 19


def max_json_values(limits: Limits) -> int:
    """How many ``{``, ``[`` and ``,`` a request body may hold: generous for ``max_instances`` images."""
    return 16 * limits.max_instances + 256


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(f"a number in the request has {len(text.lstrip('-'))} digits; integers here have at most "
                           f"{MAX_INT_DIGITS}")
    return int(text)


def load_json(body: bytes | memoryview, limits: Limits, what: str = "request body"):
    """``body`` parsed as JSON, or a RequestError (400) whatever its shape (module docstring)."""
    body = bytes(body)
    values = body.count(b"{") + body.count(b"[") + body.count(b",")
    if values > max_json_values(limits):
        raise RequestError(f"{what} holds {values:,} JSON objects, arrays and separators, more than a request of at "
                           f"most {limits.max_instances} images needs ({max_json_values(limits):,})")
    try:
        return json.loads(body, parse_int=_bounded_int)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError(f"{what} is nested too deeply to be a request") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise RequestError(f"{what} is not valid JSON ({exc})") from None


def check_top_k(value, n_classes: int, where: str = "parameters.top_k") -> int:
    """``value`` as a k in [1, n_classes]; bool, float and text are refused, not coerced."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{where} must be an integer from 1 to {n_classes}, got {value!r}")
    if not 1 <= value <= n_classes:
        raise RequestError(f"{where} must be from 1 to {n_classes} (the served model has {n_classes} classes), "
                           f"got {value}")
    return value


def default_top_k(n_classes: int) -> int:
    return min(DEFAULT_TOP_K, n_classes)


def decode_b64(text, where: str, limits: Limits) -> bytes:
    """Image bytes from base64 text (line breaks and a ``data:...;base64,`` prefix allowed)."""
    if not isinstance(text, str):
        raise RequestError(f"{where} must be base64 text, got {type(text).__name__}")
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(f"{where}: a data: URI must be base64-encoded (data:image/png;base64,...)")
    text = "".join(text.split())  # `base64` wraps its output at 76 columns
    if not text:
        raise RequestError(f"{where} is empty: expected base64-encoded image bytes")
    if len(text) // 4 * 3 > limits.max_image_bytes + 2:
        raise RequestError(f"{where}: the image is about {len(text) * 3 // 4 / MiB:.1f} MiB, more than the "
                           f"{limits.max_image_bytes / MiB:g} MiB limit per image", 413)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where} is not valid base64 text (standard alphabet A-Z a-z 0-9 + /, "
                           "padded with =)") from None


def check_fields(fields, allowed, where: str) -> None:
    extra = sorted(set(fields) - set(allowed))
    if extra:
        raise RequestError(f"{where}: unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}; "
                           f"allowed: {', '.join(allowed)}")


def check_body_size(size: int, limits: Limits) -> None:
    if size > limits.max_body_bytes:
        raise RequestError(f"request body is {size / MiB:.1f} MiB, more than the "
                           f"{limits.max_body_bytes / MiB:g} MiB limit: send fewer images per request", 413)


def check_count(count: int, limits: Limits, what: str = "instances") -> None:
    if count > limits.max_instances:
        raise RequestError(f"request has {count} {what}, more than the limit of {limits.max_instances}: split it "
                           "into several requests", 413)


def parse_request(body: bytes, limits: Limits, n_classes: int) -> PredictRequest:
    """Validate a request body completely (fields, counts, sizes, base64) before any work is done."""
    check_body_size(len(body), limits)
    doc = load_json(body, limits)
    if not isinstance(doc, dict):
        raise RequestError('request body must be a JSON object: {"instances": [{"b64": "..."}]}')
    check_fields(doc, REQUEST_FIELDS, "request")
    instances = doc.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RequestError('request needs "instances": a non-empty list of {"b64": "..."} or {"url": "..."}')
    check_count(len(instances), limits)
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError('"parameters" must be a JSON object, e.g. {"top_k": 3}')
    check_fields(params, PARAMETER_FIELDS, "parameters")
    top_k = check_top_k(params["top_k"], n_classes) if "top_k" in params else default_top_k(n_classes)
    images = []
    for i, item in enumerate(instances):
        where = f"instances[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f'{where} must be an object {{"b64": "..."}} or {{"url": "..."}}, '
                               f"got {type(item).__name__}")
        check_fields(item, INSTANCE_FIELDS, where)
        if len(item) != 1:
            raise RequestError(f'{where} needs exactly one of "b64" or "url"')
        if "b64" in item:
            images.append(ImageInput(i, data=decode_b64(item["b64"], f"{where}.b64", limits)))
        else:
            url = item["url"]
            if not isinstance(url, str) or not url:
                raise RequestError(f"{where}.url must be a non-empty string")
            images.append(ImageInput(i, url=url))
    return PredictRequest(images, top_k)


def prediction(labels: list[str], probabilities: list[float]) -> dict:
    return {"labels": labels, "probabilities": probabilities}


def example_image_b64(size: int = 32) -> str:
    """A small, valid PNG (a colour gradient) as base64: input examples and smoke predictions."""
    import io

    from PIL import Image

    image = Image.new("RGB", (size, size))
    image.putdata([(x * 255 // size, y * 255 // size, 128) for y in range(size) for x in range(size)])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
