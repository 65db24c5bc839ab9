"""A local HTTP endpoint that answers like the Kubernetes API for KServe InferenceServices.

It stores the objects it is sent (create, get, replace with resourceVersion checks,
delete; Status bodies for errors) and plays KServe's controller in Serverless mode: every
change of the predictor creates a revision ``NAME-predictor-0000N`` that becomes ready
after ``ready_after`` reads, or fails (``Ready=False, RevisionFailed``) when the model
version it serves is in ``broken``; traffic follows ``canaryTrafficPercent`` between the
last rolled-out revision and the latest ready one, and with no canary field the latest
ready revision is rolled out to 100%. Tagged traffic entries carry ``predictor_url`` so
the deploy step can send its smoke prediction there. Every request is recorded.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATH = re.compile(r"^/apis/serving\.kserve\.io/v1beta1/namespaces/(?P<ns>[^/]+)/inferenceservices(?:/(?P<name>[^/?]+))?")
VERSION_LABEL = "saft.io/model-version"


class FakeKServe:
    def __init__(self, predictor_url: str, ready_after: int = 1):
        self.objects: dict[tuple[str, str], dict] = {}
        self.state: dict[tuple[str, str], dict] = {}
        self.requests: list[dict] = []
        self.broken: set[str] = set()  # model versions whose revisions never become ready
        self.predictor_url, self.ready_after = predictor_url, ready_after
        self._version = 100
        self._lock = threading.Lock()

    # -- the controller ---------------------------------------------------------------------

    def _new_revision(self, key, obj) -> None:
        st = self.state.setdefault(key, {"revisions": [], "rolled": None, "previous": None})
        version = obj["metadata"].get("labels", {}).get(VERSION_LABEL)
        name = f"{key[1]}-predictor-{len(st['revisions']) + 1:05d}"
        st["revisions"].append({"name": name, "version": version, "reads": 0})

    def _status(self, key, obj) -> dict:
        st = self.state[key]
        latest = st["revisions"][-1]
        latest["reads"] += 1
        failed = latest["version"] in self.broken
        ready = not failed and latest["reads"] > self.ready_after
        ready_names = [r["name"] for r in st["revisions"][:-1] if r["version"] not in self.broken]
        latest_ready = latest["name"] if ready else (st["rolled"] if st["rolled"] in ready_names else None)
        canary = obj["spec"]["predictor"].get("canaryTrafficPercent")
        if ready and (canary is None or canary == 100 or st["rolled"] is None) and st["rolled"] != latest["name"]:
            st["previous"], st["rolled"] = st["rolled"], latest["name"]  # rolled out to 100%
        traffic = []
        if ready and st["rolled"] != latest["name"] and canary is not None:
            traffic = [{"revisionName": st["rolled"], "percent": 100 - canary, "tag": "prev",
                        "url": self.predictor_url},
                       {"revisionName": latest["name"], "percent": canary, "tag": "latest", "latestRevision": True,
                        "url": self.predictor_url}]
        elif st["rolled"]:
            traffic = [{"revisionName": st["rolled"], "percent": 100, "latestRevision": st["rolled"] == latest["name"],
                        "tag": "latest", "url": self.predictor_url}]
        if failed:
            cond = {"status": "False", "reason": "RevisionFailed",
                    "message": f"Revision \"{latest['name']}\" failed: container kserve-container exited with 3"}
        else:
            cond = {"status": "True" if ready else "Unknown"}
        return {
            "observedGeneration": obj["metadata"]["generation"],
            "conditions": [{"type": t, **cond} for t in ("PredictorReady", "Ready")],
            "url": f"http://{key[1]}.{key[0]}.example.com",
            "components": {"predictor": {
                "latestCreatedRevision": latest["name"], "latestReadyRevision": latest_ready,
                "latestRolledoutRevision": st["rolled"], "previousRolledoutRevision": st["previous"],
                "traffic": traffic, "url": f"http://{key[1]}-predictor.{key[0]}.example.com"}},
        }

    # -- the API ----------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        match = PATH.match(path)
        if not match:
            return 404, _status(404, "NotFound", f"the server could not find the requested resource {path}")
        key_ns, name = match["ns"], match["name"]
        with self._lock:
            if method == "POST" and name is None:
                key = (key_ns, body["metadata"]["name"])
                if key in self.objects:
                    return 409, _status(409, "AlreadyExists", f"inferenceservices \"{key[1]}\" already exists")
                obj = copy.deepcopy(body)
                obj["metadata"].update(generation=1, resourceVersion=self._bump(), uid=f"uid-{key[1]}")
                self.objects[key] = obj
                self._new_revision(key, obj)
                return 201, copy.deepcopy(obj)
            key = (key_ns, name)
            obj = self.objects.get(key)
            if obj is None:
                return 404, _status(404, "NotFound", f"inferenceservices.serving.kserve.io \"{name}\" not found")
            if method == "GET":
                return 200, {**copy.deepcopy(obj), "status": self._status(key, obj)}
            if method == "PUT":
                if body["metadata"].get("resourceVersion") != obj["metadata"]["resourceVersion"]:
                    return 409, _status(409, "Conflict", "the object has been modified; please apply your changes "
                                                         "to the latest version and try again")
                new = copy.deepcopy(body)
                new.pop("status", None)
                changed = new["spec"] != obj["spec"]
                containers_changed = (new["spec"]["predictor"].get("containers")
                                      != obj["spec"]["predictor"].get("containers"))
                new["metadata"]["generation"] = obj["metadata"]["generation"] + (1 if changed else 0)
                new["metadata"]["resourceVersion"] = self._bump()
                self.objects[key] = new
                if containers_changed:
                    self._new_revision(key, new)
                return 200, copy.deepcopy(new)
            if method == "DELETE":
                del self.objects[key]
                self.state.pop(key, None)
                return 200, _status(200, "Success", "deleted")
        return 405, _status(405, "MethodNotAllowed", method)

    def _bump(self) -> str:
        self._version += 1
        return str(self._version)

    def writes(self) -> list[dict]:
        return [r for r in self.requests if r["method"] != "GET"]


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure" if code >= 400 else "Success",
            "message": message, "reason": reason, "code": code}


def serve_fake(fake: FakeKServe) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _do(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            fake.requests.append({"method": self.command, "path": self.path, "body": body,
                                  "authorization": self.headers.get("Authorization")})
            status, doc = fake.handle(self.command, self.path, body)
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _do

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


class FakePredictor(BaseHTTPRequestHandler):
    """Answers smoke predictions like ``saft serve``; ``healthy = False`` makes it fail with a 500."""

    healthy = True
    calls: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        type(self).calls.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ok = type(self).healthy
        doc = {"predictions": [{"labels": ["circle"], "probabilities": [0.9]}]} if ok else {"error": "internal error"}
        data = json.dumps(doc).encode()
        self.send_response(200 if ok else 500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


TRAINJOB_PATH = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/(?P<ns>[^/]+)/trainjobs"
                           r"(?:/(?P<name>[^/?]+))?")


class FakeTrainer:
    """The Kubernetes API for Kubeflow Trainer TrainJobs, with a controller that finishes each job.

    A created job runs for ``run_reads`` reads, then gets ``Complete`` (calling
    ``on_complete(manifest)`` first, as the job would have written its outputs) or, when
    ``fail_message`` is set, ``Failed`` with reason ``JobFailed``; ``run_reads=None``
    keeps it running forever. ``forbidden`` namespaces answer 403 to a create.
    """

    def __init__(self, run_reads: int | None = 2, fail_message: str = "", on_complete=None):
        self.objects: dict[tuple[str, str], dict] = {}
        self.reads: dict[tuple[str, str], int] = {}
        self.requests: list[dict] = []
        self.run_reads, self.fail_message, self.on_complete = run_reads, fail_message, on_complete
        self.forbidden: set[str] = set()
        self._lock = threading.Lock()

    def _status(self, key, obj) -> dict:
        self.reads[key] = self.reads.get(key, 0) + 1
        conds = [{"type": "Created", "status": "True", "reason": "JobsCreated", "message": "jobs created"}]
        if self.run_reads is not None and self.reads[key] > self.run_reads:
            if self.fail_message:
                conds.append({"type": "Failed", "status": "True", "reason": "JobFailed", "message": self.fail_message})
            else:
                if self.reads[key] == self.run_reads + 1 and self.on_complete is not None:
                    self.on_complete(obj)
                conds.append({"type": "Complete", "status": "True", "reason": "JobsCompleted",
                              "message": "jobs completed"})
        return {"conditions": conds}

    def handle(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        match = TRAINJOB_PATH.match(path)
        if not match:
            return 404, _status(404, "NotFound", f"the server could not find the requested resource {path}")
        ns, name = match["ns"], match["name"]
        with self._lock:
            if method == "POST" and name is None:
                if ns in self.forbidden:
                    return 403, _status(403, "Forbidden", f"trainjobs.trainer.kubeflow.org is forbidden: User "
                                                          f"\"system:serviceaccount:{ns}:pipeline-runner\" cannot "
                                                          f"create resource \"trainjobs\" in namespace \"{ns}\"")
                key = (ns, body["metadata"]["name"])
                if key in self.objects:
                    return 409, _status(409, "AlreadyExists", f"trainjobs \"{key[1]}\" already exists")
                self.objects[key] = copy.deepcopy(body)
                return 201, copy.deepcopy(body)
            key = (ns, name)
            obj = self.objects.get(key)
            if obj is None:
                return 404, _status(404, "NotFound", f"trainjobs.trainer.kubeflow.org \"{name}\" not found")
            if method == "GET":
                return 200, {**copy.deepcopy(obj), "status": self._status(key, obj)}
            if method == "DELETE":
                del self.objects[key]
                return 200, _status(200, "Success", "deleted")
        return 405, _status(405, "MethodNotAllowed", method)
