"""Constants and helpers shared by the tracking tests (conftest.py holds only fixtures).

A module of its own, because several test folders have a conftest.py and a plain
``from conftest import ...`` would pick whichever was imported first.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from services import Service

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
SUITE = "mini-shift"
FEW_SHOT = 8  # training images per class
TEST_PER_CLASS = 20
ALPHA = 0.5  # the registered candidate: base + 0.5 * delta (ID up, OOD kept on this world)


@dataclass(frozen=True)
class Candidate:
    root: Path
    data_dir: Path
    mask: Path
    mask_stats: Path
    delta: Path
    history: Path
    eval_dir: Path

    @property
    def metrics(self) -> Path:
        return self.eval_dir / "metrics.json"

    def doc(self) -> dict:
        return json.loads(self.metrics.read_text())

    def classes(self) -> list[str]:
        return json.loads((self.data_dir / "classes.json").read_text())


@dataclass(frozen=True)
class MlflowServer:
    url: str
    bucket: str
    s3_endpoint: str
    log: Path

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url)

    def s3_keys(self, prefix: str = "mlflow/") -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        keys, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = s3.list_objects_v2(**kwargs)
            keys += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]


def stop_service(service: Service) -> None:
    """Stop the process by its pid, then anything it forked (its own session, pgid == pid)."""
    service.stop()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(service.process.pid, signal.SIGKILL)


def shifted_document(doc: dict, *, ood: float = 0.0, id: float = 0.0, model: str = "saft", alpha: float = ALPHA,
                     rename: str | None = None, suite: str | None = None) -> dict:
    """A metrics document derived from a real one: ``model``@``alpha``'s ID/OOD top-1 moved by
    ``id``/``ood`` (clamped to [0, 1]), optionally renamed or on another suite; aggregates recomputed."""
    from dataclasses import replace

    from saft.eval.metrics import metrics_document, records_from_document

    records = []
    for r in records_from_document(doc):
        if r.model == model and r.alpha == alpha:
            shift = ood if r.role == "ood" else id if r.role == "id" else 0.0
            r = replace(r, top1=min(1.0, max(0.0, r.top1 + shift)), model=rename or r.model)
        records.append(r)
    meta = {**doc["meta"], **({"suite": suite} if suite else {})}
    return metrics_document(records, meta)


def png_b64(image) -> str:
    """A PIL image as the base64 PNG text a served model takes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_document(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


class BasicAuthProxy:
    """A reverse proxy on 127.0.0.1 that answers 401 unless the request carries ``user:password`` (basic auth).

    Stands in for the authenticating ingress in front of a tracking server: it forwards
    every method, header and body to ``upstream`` and counts what it let through.
    """

    def __init__(self, upstream: str, user: str, password: str):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        target = urlsplit(upstream)
        proxy = self
        self.allowed = self.refused = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != expected:
                    proxy.refused += 1
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                proxy.allowed += 1
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization",
                                                                                      "connection")}
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                finally:
                    conn.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
