"""A local HTTP endpoint that answers the few KFP v2beta1 calls the kfp client makes, and
records every request (bound to 127.0.0.1, stopped by the fixture that starts it)."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


class FakeKfp(BaseHTTPRequestHandler):
    requests: list[dict] = []
    run_state = "SUCCEEDED"  # what GET /runs/<id> reports

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        entry = {"method": self.command, "path": self.path,
                 "headers": {k.lower(): v for k, v in self.headers.items()},
                 "body": json.loads(raw) if raw else None}
        self.requests.append(entry)
        return entry

    def do_GET(self) -> None:
        self._record()
        if "/experiments" in self.path:
            self._reply({"experiments": [], "total_size": 0})
        elif self.path.startswith("/apis/v2beta1/runs/"):
            run_id = self.path.rsplit("/", 1)[-1].split("?")[0]
            self._reply({"run_id": run_id, "display_name": "r", "experiment_id": "exp-1", "state": self.run_state})
        else:
            self._reply({"multi_user": False})

    def do_POST(self) -> None:
        entry = self._record()
        if self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({"experiment_id": "exp-1", "display_name": entry["body"]["display_name"]})
        elif self.path.startswith("/apis/v2beta1/runs"):
            self._reply({"run_id": "run-42", "display_name": entry["body"].get("display_name", ""),
                         "experiment_id": "exp-1"})
        elif self.path.startswith("/apis/v2beta1/recurringruns"):
            self._reply({"recurring_run_id": "rr-7", "display_name": entry["body"].get("display_name", "")})
        else:
            self.send_response(404)
            self.end_headers()


@contextmanager
def fake_kfp_server(monkeypatch) -> Iterator[tuple[str, list[dict]]]:
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    FakeKfp.requests = []
    FakeKfp.run_state = "SUCCEEDED"
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", FakeKfp.requests
    finally:
        server.shutdown()
        server.server_close()


def submitted_run(requests: list[dict]) -> dict:
    """The body of the (one) run creation request."""
    return next(r for r in requests if r["method"] == "POST" and r["path"].startswith("/apis/v2beta1/runs"))["body"]
