"""``saft serve`` over HTTP: batched top-k answers, and a clear 4xx (never a traceback) for each bad request."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from serving_support import CLASSES, InProcessServer, Reply, encoded, get, post, shape_images

from saft.serving.protocol import example_image_b64


def _instances(images):
    return [{"b64": encoded(im)} for im in images]


def _no_trace(reply) -> None:
    text = json.dumps(reply.body)
    assert set(reply.body) == {"error"} and "Traceback" not in text and 'File "' not in text


def test_a_batched_request_gets_top_k_labels_like_the_pyfunc(server, served_folder, monkeypatch) -> None:
    import mlflow.pyfunc
    import pandas as pd

    images = shape_images(5)
    reply = post(server.predict_url(), {"instances": _instances(images), "parameters": {"top_k": 3}})
    assert reply.status == 200, reply.body
    assert reply.body["model_name"] == "shapes"
    predictions = reply.body["predictions"]
    assert len(predictions) == 5
    for row in predictions:
        assert len(row["labels"]) == 3 and set(row["labels"]) <= set(CLASSES)
        assert row["probabilities"] == sorted(row["probabilities"], reverse=True) and 0 < sum(row["probabilities"]) <= 1
    default = post(server.predict_url(), {"instances": _instances(images[:1])})
    assert len(default.body["predictions"][0]["labels"]) == 5  # default k: min(5, classes)
    # the MLflow pyfunc answers the same (its predict is what `mlflow models serve` runs)
    monkeypatch.setenv("SAFT_CACHE_DIR", str(served_folder / "cache"))
    model = mlflow.pyfunc.load_model(str(served_folder / "model"))
    frame = model.predict(pd.DataFrame({"image": [encoded(im) for im in images]}), params={"top_k": 3})
    assert list(frame["label"]) == [row["labels"][0] for row in predictions]
    for got, want in zip(frame["probabilities"], predictions):
        assert list(got) == pytest.approx(want["probabilities"], abs=1e-5)


def test_every_bad_request_gets_a_clear_4xx(server, monkeypatch) -> None:
    url = server.predict_url()
    ok = example_image_b64()
    cases = [
        ({"instances": [{"b64": ok}], "stream": True}, None, 400, "unknown field 'stream'"),
        ({"instances": [{"b64": ok, "mime": "image/png"}]}, None, 400, "instances[0]: unknown field 'mime'"),
        ({"instances": [{"b64": "%%%"}]}, None, 400, "not valid base64"),
        ({"instances": [{"b64": ok}, {"b64": "aGVsbG8gd29ybGQ="}]}, None, 400, "instances[1] is not a readable image"),
        ({"instances": [{"b64": ok}], "parameters": {"top_k": 6}}, None, 400, "5 classes"),
        ({"instances": [{"b64": ok}] * 9}, None, 413, "limit of 8"),
        ({"instances": [{"b64": encoded(shape_images(1)[0].resize((600, 600)))}]}, None, 413, "600 x 600 pixels"),
        (None, b"{\"instances\": [", 400, "not valid JSON"),
        ({"instances": [{"url": "http://images.example.com/a.png"}]}, None, 403, "allow-list"),
        ({"instances": [{"url": "file:///etc/passwd"}]}, None, 400, "only http and https"),
    ]
    for payload, raw, status, needle in cases:
        reply = post(url, payload, raw=raw)
        assert reply.status == status, (needle, reply.body)
        assert needle in reply.body["error"], (needle, reply.body)
        _no_trace(reply)
    for reply in (_declared_too_large(server), _streamed_too_large(server)):
        assert reply.status == 413 and "MiB limit" in reply.body["error"], reply.body
        _no_trace(reply)
    for reply, status in ((post(server.predict_url("other"), {"instances": [{"b64": ok}]}), 404),
                          (get(server.predict_url()), 405), (get(f"{server.url}/v1/nothing"), 404),
                          (post(f"{server.url}/v1/models/shapes:explain", {}), 404)):
        assert reply.status == status, reply.body
        _no_trace(reply)


def _declared_too_large(server):
    """A body declared over the limit is refused from its headers, before it is sent."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/models/shapes:predict")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(3 << 20))
    conn.endheaders()
    response = conn.getresponse()
    try:
        return Reply(response.status, json.loads(response.read()))
    finally:
        conn.close()


def _streamed_too_large(server):
    """A chunked body (no length declared) is cut off once it passes the limit."""
    chunks = (b'{"instances": [' + b" " * (64 << 10) for _ in range(40))  # 2.5 MiB against a 2 MiB limit
    return post(server.predict_url(), None, raw=chunks, headers={"Transfer-Encoding": "chunked"})


class _OneImage(BaseHTTPRequestHandler):
    png = b""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)


def test_urls_are_fetched_when_the_policy_allows(server) -> None:
    import base64

    image = shape_images(1)[0]
    _OneImage.png = base64.b64decode(encoded(image))
    images = ThreadingHTTPServer(("127.0.0.1", 0), _OneImage)
    threading.Thread(target=images.serve_forever, args=(0.05,), daemon=True).start()
    try:
        by_url = post(server.predict_url(), {"instances": [{"url": f"http://127.0.0.1:{images.server_address[1]}/a"}]})
    finally:
        images.shutdown()
        images.server_close()
    by_bytes = post(server.predict_url(), {"instances": [{"b64": encoded(image)}]})
    assert by_url.status == 200, by_url.body
    assert by_url.body["predictions"] == by_bytes.body["predictions"]


def test_an_internal_failure_is_a_500_without_details(server, monkeypatch) -> None:
    def explode(pixels):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(server.served.classifier, "probabilities", explode)
    reply = post(server.predict_url(), {"instances": [{"b64": example_image_b64()}]})
    assert reply.status == 500 and "RuntimeError" in reply.body["error"]
    assert "secret internal detail" not in reply.body["error"]
    _no_trace(reply)


def test_probes_before_and_after_loading(server, served_folder) -> None:
    from saft.serving.server import ServeConfig

    assert get(f"{server.url}/v2/health/live").status == 200
    assert get(f"{server.url}/v2/health/ready").body == {"ready": True}
    meta = get(f"{server.url}/v1/models/shapes").body
    assert meta["ready"] and meta["classes"] == 5 and meta["load_seconds"] > 0
    loading = InProcessServer(ServeConfig(str(served_folder / "model"), name="shapes"), load=False)
    try:
        assert get(f"{loading.url}/v2/health/live").status == 200  # alive while the model loads
        assert get(f"{loading.url}/v2/health/ready").status == 503
        reply = post(loading.predict_url(), {"instances": [{"b64": example_image_b64()}]})
        assert reply.status == 503 and "still loading" in reply.body["error"]
    finally:
        loading.stop()


def test_a_model_that_cannot_load_ends_the_server_with_its_reason(served_folder, tmp_path, monkeypatch, caplog):
    from services import free_port

    from saft.serving.server import LOAD_FAILED_EXIT, ServeConfig, serve

    copy = tmp_path / "model"
    shutil.copytree(served_folder / "model", copy)
    ref_path = copy / "artifacts" / "model_ref.json"
    ref = json.loads(ref_path.read_text())
    ref["base_fingerprint"] = ref["base"]["fingerprint"] = "0" * 64
    ref_path.write_text(json.dumps(ref))
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level("ERROR", logger="saft.serve"):
        assert serve(ServeConfig(str(copy), port=free_port())) == LOAD_FAILED_EXIT
    assert "BaseMismatch" in caplog.text and "000000000000" in caplog.text
