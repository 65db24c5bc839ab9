"""``saft serve`` speaks KServe's V2 Open Inference Protocol, lists its model for V1, and exports /metrics.

Requests go over real HTTP (http.client on 127.0.0.1). :class:`KServeV2Client` builds them
byte for byte as KServe's Python client does (``kserve.InferenceRESTClient`` with protocol
v2, read from its source): ``InferRequest.to_rest()`` serialised compactly (orjson) in the
order id, model_name, inputs, outputs, parameters; a BYTES input filled by
``InferInput.set_data_from_numpy(array)`` (default ``binary_data=True``) travels as binary
tensor data after the JSON (each element a 4-byte little-endian length and the bytes), with
the headers ``inference-header-content-length`` and ``content-type:
application/octet-stream``; a JSON-only request carries no content-type (httpx's
``content=``). Answers are read as ``InferResponse.from_bytes`` does.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import struct
import uuid

import pytest
from serving_support import CLASSES, encoded, get, post, shape_images

from saft.serving.protocol import example_image_b64


class KServeV2Client:
    def __init__(self, port: int):
        self.port = port

    def _post(self, path: str, body: bytes, headers: dict) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def infer(self, model: str, files: list[bytes], *, binary: bool, parameters: dict | None = None,
              outputs: list[str] | None = None, input_name: str = "image") -> tuple[int, dict]:
        request = {"id": str(uuid.uuid4()), "model_name": model}
        tensor = {"name": input_name, "shape": [len(files)], "datatype": "BYTES"}
        raw = b""
        if binary:
            raw = b"".join(struct.pack("<I", len(f)) + f for f in files)
            tensor["parameters"] = {"binary_data_size": len(raw)}
        else:  # binary_data=False needs UTF-8 text: image files go base64-encoded, as KServe's examples do
            tensor["data"] = [base64.b64encode(f).decode() for f in files]
        request["inputs"] = [tensor]
        if outputs:
            request["outputs"] = [{"name": name} for name in outputs]
        if parameters:
            request["parameters"] = parameters
        head = json.dumps(request, separators=(",", ":")).encode()
        headers = {"inference-header-content-length": str(len(head)),
                   "content-type": "application/octet-stream"} if binary else {}
        status, response_headers, body = self._post(f"/v2/models/{model}/infer", head + raw, headers)
        length = int(response_headers.get("inference-header-content-length", len(body)))
        doc = json.loads(body[:length])
        if status == 200:
            for output in doc["outputs"]:  # what InferOutput needs: name, shape, datatype, data
                assert set(output) >= {"name", "shape", "datatype", "data"}, output
        doc["_sent_id"] = request["id"]
        return status, doc


def _files(n: int) -> list[bytes]:
    return [base64.b64decode(encoded(im)) for im in shape_images(n)]


def _rows(doc: dict) -> list[dict]:
    outputs = {o["name"]: o for o in doc["outputs"]}
    n, k = outputs["labels"]["shape"]
    labels, probs = outputs["labels"]["data"], outputs["probabilities"]["data"]
    return [{"labels": labels[i * k:(i + 1) * k], "probabilities": probs[i * k:(i + 1) * k]} for i in range(n)]


def test_health_metadata_and_model_listing(server) -> None:
    assert get(f"{server.url}/v2/health/live").body == {"live": True}
    assert get(f"{server.url}/v2/health/ready").body == {"ready": True}
    meta = get(f"{server.url}/v2")
    assert meta.status == 200 and meta.body["name"] == "saft" and "binary_tensor_data" in meta.body["extensions"]
    model = get(f"{server.url}/v2/models/shapes")
    assert model.status == 200 and model.body["name"] == "shapes" and model.body["platform"]
    assert model.body["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in model.body["outputs"]] == ["labels", "probabilities"]
    assert get(f"{server.url}/v2/models/shapes/ready").body == {"name": "shapes", "ready": True}
    assert get(f"{server.url}/v1/models").body == {"models": ["shapes"]}
    v1 = get(f"{server.url}/v1/models/shapes").body
    assert v1["device"] == "cpu" and v1["precision"] == "fp32" and v1["classes"] == len(CLASSES)
    for path in ("/v2/models/other", "/v2/models/other/ready", "/v2/models/shapes/versions/3",
                 "/v2/models/shapes/versions/3/ready"):
        reply = get(f"{server.url}{path}")
        assert reply.status == 404 and set(reply.body) == {"error"}, (path, reply.body)


def test_a_kserve_v2_client_gets_what_v1_answers_in_both_request_forms(server) -> None:
    client, files = KServeV2Client(server.port), _files(3)
    v1 = post(server.predict_url(), {"instances": [{"b64": base64.b64encode(f).decode()} for f in files],
                                     "parameters": {"top_k": 3}})
    assert v1.status == 200, v1.body
    for binary in (True, False):
        status, doc = client.infer("shapes", files, binary=binary, parameters={"top_k": 3})
        assert status == 200, doc
        assert doc["model_name"] == "shapes" and doc["id"] == doc["_sent_id"]
        assert "model_version" not in doc  # a model folder has no version
        outputs = {o["name"]: o for o in doc["outputs"]}
        assert outputs["labels"]["datatype"] == "BYTES" and outputs["probabilities"]["datatype"] == "FP32"
        assert outputs["labels"]["shape"] == outputs["probabilities"]["shape"] == [3, 3]
        for got, want in zip(_rows(doc), v1.body["predictions"]):
            assert got["labels"] == want["labels"]
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
    status, doc = client.infer("shapes", files[:1], binary=True, outputs=["probabilities"])
    assert status == 200 and [o["name"] for o in doc["outputs"]] == ["probabilities"]
    assert doc["outputs"][0]["shape"] == [1, 5]  # default k: min(5, classes)


def test_v2_refusals_are_clear_json(server) -> None:
    client = KServeV2Client(server.port)
    status, doc = client.infer("shapes", _files(1), binary=False, input_name="input-0")
    assert status == 400 and "'input-0'" in doc["error"] and "'image'" in doc["error"]
    status, doc = client.infer("shapes", [b"not an image"], binary=True)
    assert status == 400 and "not a readable image" in doc["error"]
    status, doc = client.infer("shapes", _files(9), binary=True)
    assert status == 413 and "limit of 8" in doc["error"]
    status, doc = client.infer("other", _files(1), binary=True)
    assert status == 404 and "serves 'shapes'" in doc["error"]
    reply = get(f"{server.url}/v2/models/shapes/infer")
    assert reply.status == 405 and set(reply.body) == {"error"}
    raw = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                  "data": [example_image_b64()]}]}).encode()
    for path, bad in (("/v2/models/shapes/infer", b"[" * 3000),  # malformed JSON of any shape: 400, never 500
                      ("/v1/models/shapes:predict",
                       b'{"instances": [{"b64": "AAAA"}], "parameters": {"top_k": ' + b"9" * 5000 + b"}}"),
                      ("/v2/models/shapes/infer", b'{"inputs": [{"name": "image", "shape": [1e999]}]}')):
        reply = post(f"{server.url}{path}", None, raw=bad)
        assert reply.status == 400 and set(reply.body) == {"error"}, (path, reply.body)
    assert post(f"{server.url}/v2/models/shapes/infer", None, raw=raw).status == 200


_SAMPLE = re.compile(r'^([a-z_]+)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')  # name{label="value",...} value


def _scrape(server) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    assert response.status == 200 and response.getheader("content-type").startswith("text/plain; version=0.0.4")
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ ", line), line
            continue
        match = _SAMPLE.match(line)
        assert match, f"not an exposition sample: {line!r}"
        samples[match[1] + (match[2] or "")] = float(match[3])
    return samples


def test_metrics_count_requests_latency_batches_and_errors(server) -> None:
    route = 'route="/v2/models/{name}/infer"'
    before = _scrape(server)
    client = KServeV2Client(server.port)
    for _ in range(3):
        assert client.infer("shapes", _files(2), binary=True)[0] == 200
    assert client.infer("shapes", [b"junk"], binary=True)[0] == 400
    after = _scrape(server)

    def grew(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert grew(f'saft_requests_total{{{route},code="200"}}') == 3
    assert grew(f'saft_requests_total{{{route},code="400"}}') == 1
    assert grew(f'saft_request_errors_total{{{route},code="400"}}') == 1
    assert grew(f'saft_request_duration_seconds_count{{{route}}}') == 4
    assert grew(f'saft_request_duration_seconds_sum{{{route}}}') > 0
    assert grew("saft_images_total") == 6 and grew("saft_batch_size_count") >= 1
    assert grew("saft_batch_size_sum") == 6
    buckets = [v for k, v in after.items() if k.startswith(f"saft_request_duration_seconds_bucket{{{route}")]
    assert buckets == sorted(buckets) and buckets[-1] == after[f"saft_request_duration_seconds_count{{{route}}}"]
    assert after["saft_ready"] == 1 and after["saft_requests_in_progress"] == 0
    assert any(k.startswith("saft_model_info{") and 'device="cpu"' in k for k in after)
    client.infer("shapes", _files(1), binary=True)  # a path a client invents is never a label
    get(f"{server.url}/v2/models/{'x' * 40}/nothing")
    assert not any("x" * 40 in k for k in _scrape(server))


def test_the_default_name_is_the_inference_service_name() -> None:
    from saft.serving.kserve import service_name
    from saft.serving.server import ServeConfig, ServedModel, default_name

    assert default_name("models:/saft_ViT.B@champion") == "saft-vit-b" == service_name("saft_ViT.B")
    assert default_name("models:/saft-tiny/4") == "saft-tiny"
    assert default_name("/models/folder") == "saft"
    assert ServedModel(ServeConfig("models:/saft_ViT.B@champion")).name == "saft-vit-b"
    assert ServedModel(ServeConfig("models:/saft_ViT.B@champion", name="isvc-name")).name == "isvc-name"
    with pytest.raises(ValueError, match="--name"):
        ServeConfig("models:/m/1", name="a/b")
