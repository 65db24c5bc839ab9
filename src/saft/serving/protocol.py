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

    def __post_init__(self):
        for name in ("max_body_bytes", "max_instances", "max_image_bytes", "max_image_pixels"):
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


def _unknown(fields, allowed, where: str) -> None:
    extra = sorted(set(fields) - set(allowed))
    if extra:
        raise RequestError(f"{where}: unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}; "
                           f"allowed: {', '.join(allowed)}")


def parse_request(body: bytes, limits: Limits, n_classes: int) -> PredictRequest:
    """Validate a request body completely (fields, counts, sizes, base64) before any work is done."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(f"request body is {len(body) / MiB:.1f} MiB, more than the "
                           f"{limits.max_body_bytes / MiB:g} MiB limit: send fewer images per request", 413)
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise RequestError('request body must be a JSON object: {"instances": [{"b64": "..."}]}')
    _unknown(doc, REQUEST_FIELDS, "request")
    instances = doc.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RequestError('request needs "instances": a non-empty list of {"b64": "..."} or {"url": "..."}')
    if len(instances) > limits.max_instances:
        raise RequestError(f"request has {len(instances)} instances, more than the limit of "
                           f"{limits.max_instances}: split it into several requests", 413)
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError('"parameters" must be a JSON object, e.g. {"top_k": 3}')
    _unknown(params, PARAMETER_FIELDS, "parameters")
    top_k = check_top_k(params["top_k"], n_classes) if "top_k" in params else default_top_k(n_classes)
    images = []
    for i, item in enumerate(instances):
        where = f"instances[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f'{where} must be an object {{"b64": "..."}} or {{"url": "..."}}, '
                               f"got {type(item).__name__}")
        _unknown(item, INSTANCE_FIELDS, where)
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
