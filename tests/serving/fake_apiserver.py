"""A local HTTP endpoint with the Kubernetes API server's object semantics, for one custom resource.

What it does as the real API server does (a subclass adds the controller and the webhook):

* ``fieldValidation``: ``Strict`` refuses unknown fields (400, ``strict decoding error: unknown
  field "spec.x"``); ``Warn`` (the default) and ``Ignore`` drop them from the stored object,
  ``Warn`` with a ``Warning: 299 - "unknown field ..."`` header per field;
* ``dryRun=All``: validation and admission run, nothing is stored;
* create: ``generation`` 1, ``resourceVersion``, ``uid``; a name in use is a 409
  ``AlreadyExists`` whose message starts ``object is being deleted:`` while the object
  terminates;
* replace: 422 ``Invalid`` without ``metadata.resourceVersion``, 409 ``Conflict`` with a stale
  one; ``generation`` moves only when ``spec`` changes;
* delete: an object with finalizers (its controller's, or ``foregroundDeletion`` under
  ``propagationPolicy=Foreground``) gets a ``deletionTimestamp`` and stays until
  ``finalize_reads`` reads later its controller has removed them;
* errors are ``Status`` objects with ``reason`` and ``code``.

Every request is recorded in ``requests`` (method, path, query, body, authorization).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

META = {"name": None, "namespace": None, "labels": None, "annotations": None, "resourceVersion": None,
        "generation": None, "uid": None, "creationTimestamp": None, "finalizers": None, "deletionTimestamp": None,
        "deletionGracePeriodSeconds": None, "ownerReferences": None, "managedFields": None, "generateName": None}


def status_doc(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure" if code >= 400 else "Success",
            "message": message, "reason": reason, "code": code}


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def unknown_fields(value, known, path: str = "") -> list[str]:
    """Paths in ``value`` that the known-fields tree ``known`` does not have.

    ``known`` is a dict of field -> subtree, a one-element list ``[subtree]`` for a list of
    objects, or None for anything (maps, free-form values).
    """
    if known is None:
        return []
    if isinstance(known, list):
        return [p for i, item in enumerate(value if isinstance(value, list) else [])
                for p in unknown_fields(item, known[0], f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    found = []
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        if key not in known:
            found.append(where)
        else:
            found += unknown_fields(item, known[key], where)
    return found


def prune(value, known):
    """``value`` without the fields ``known`` does not have (what the server stores under Warn/Ignore)."""
    if known is None:
        return value
    if isinstance(known, list):
        return [prune(item, known[0]) for item in value] if isinstance(value, list) else value
    if not isinstance(value, dict):
        return value
    return {k: prune(v, known[k]) for k, v in value.items() if k in known}


class FakeAPI:
    """One namespaced custom resource; subclasses set the names, the schema and the controller hooks."""

    group = version = plural = kind = ""
    spec_fields: dict = {}  # the CRD's structural schema, as a known-fields tree of ``spec``
    finalizers: tuple[str, ...] = ()  # what the resource's controller puts on every object

    def __init__(self, finalize_reads: int = 1):
        self.objects: dict[tuple[str, str], dict] = {}
        self.requests: list[dict] = []
        self.finalize_reads = finalize_reads
        self._removing: dict[tuple[str, str], int] = {}
        self._rv = 100
        self._lock = threading.Lock()

    # -- hooks for the subclass: the webhook, the controller --------------------------------------------

    def invalid(self, obj: dict, old: dict | None) -> list[str]:
        """Schema-level errors (422 Invalid): CEL rules, minimums, immutable fields."""
        return []

    def admit(self, operation: str, obj: dict, old: dict | None) -> str | None:
        """A validating admission webhook: a denial message, or None. It may mutate ``obj``."""
        return None

    def observe(self, key, obj: dict) -> dict | None:
        """The object's status as its controller has it now (called on every read)."""
        return obj.get("status")

    def stored(self, key, obj: dict, old: dict | None) -> None:
        """A create (``old`` None) or replace was stored."""

    def gone(self, key) -> None:
        """The object was removed for good."""

    def extra(self, method: str, path: str) -> tuple[int, dict] | None:
        """Other routes of this API server (e.g. Deployments), or None."""
        return None

    # -- the API ---------------------------------------------------------------------------------------------

    @property
    def known(self) -> dict:
        return {"apiVersion": None, "kind": None, "metadata": META, "spec": self.spec_fields, "status": None}

    def _bump(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _qualified(self) -> str:
        return f"{self.plural}.{self.group}"

    def _fields(self, body: dict, validation: str, warnings: list[str]) -> tuple[dict, tuple[int, dict] | None]:
        unknown = unknown_fields(body, self.known)
        if unknown and validation == "Strict":
            listed = ", ".join(f'unknown field "{p}"' for p in unknown)
            return body, (400, status_doc(400, "BadRequest", f'{self.kind} in version "{self.version}" cannot be '
                                                             f"handled as a {self.kind}: strict decoding error: "
                                                             f"{listed}"))
        if unknown and validation != "Ignore":
            warnings += [f'unknown field "{p}"' for p in unknown]
        return prune(body, self.known), None

    def _check(self, operation: str, obj: dict, old: dict | None) -> tuple[int, dict] | None:
        errors = self.invalid(obj, old)
        if errors:
            return 422, status_doc(422, "Invalid", f'{self.kind}.{self.group} "{obj["metadata"]["name"]}" is '
                                                   f"invalid: {'; '.join(errors)}")
        denied = self.admit(operation, obj, old)
        if denied:
            return 403, status_doc(403, "Forbidden", f'admission webhook "{self.plural}.{self.group}.validator" '
                                                     f"denied the request: {denied}")
        return None

    def handle(self, method: str, path: str, body: dict | None, query: dict[str, str]) -> tuple[int, dict, list[str]]:
        warnings: list[str] = []
        with self._lock:
            routed = self.extra(method, path)
            if routed is not None:
                return (*routed, warnings)
            match = re.match(rf"^/apis/{re.escape(self.group)}/{self.version}/namespaces/(?P<ns>[^/]+)/"
                             rf"{self.plural}(?:/(?P<name>[^/]+))?$", path)
            if not match:
                return 404, status_doc(404, "NotFound", "the server could not find the requested resource"), warnings
            dry = query.get("dryRun") == "All"
            validation = query.get("fieldValidation", "Warn")
            ns, name = match["ns"], match["name"]
            self._tick((ns, name or ((body or {}).get("metadata") or {}).get("name")))
            if method == "POST" and name is None:
                return (*self._create(ns, body, dry, validation, warnings), warnings)
            key = (ns, name)
            obj = self.objects.get(key)
            if obj is None:
                return 404, status_doc(404, "NotFound", f'{self._qualified()} "{name}" not found'), warnings
            if method == "GET":
                return 200, {**copy.deepcopy(obj), "status": self.observe(key, obj)}, warnings
            if method == "PUT":
                return (*self._replace(key, obj, body, dry, validation, warnings), warnings)
            if method == "DELETE":
                policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy") or "Background"
                return (*self._delete(key, obj, policy, dry), warnings)
        return 405, status_doc(405, "MethodNotAllowed", method), warnings

    def _create(self, ns: str, body: dict, dry: bool, validation: str, warnings: list[str]) -> tuple[int, dict]:
        obj, refused = self._fields(copy.deepcopy(body), validation, warnings)
        if refused:
            return refused
        name = obj["metadata"]["name"]
        key = (ns, name)
        if key in self.objects:
            message = f'{self._qualified()} "{name}" already exists'
            if self.objects[key]["metadata"].get("deletionTimestamp"):
                message = f"object is being deleted: {message}"
            return 409, status_doc(409, "AlreadyExists", message)
        obj.pop("status", None)
        obj["metadata"].update(namespace=ns, generation=1, uid=f"uid-{name}-{self._rv}", creationTimestamp=now_iso())
        if self.finalizers:
            obj["metadata"]["finalizers"] = list(self.finalizers)
        refused = self._check("CREATE", obj, None)
        if refused:
            return refused
        if dry:
            return 201, obj
        obj["metadata"]["resourceVersion"] = self._bump()
        self.objects[key] = obj
        self.stored(key, obj, None)
        return 201, copy.deepcopy(obj)

    def _replace(self, key, old: dict, body: dict, dry: bool, validation: str,
                 warnings: list[str]) -> tuple[int, dict]:
        obj, refused = self._fields(copy.deepcopy(body), validation, warnings)
        if refused:
            return refused
        version = obj["metadata"].get("resourceVersion")
        if not version:
            return 422, status_doc(422, "Invalid", f'{self.kind}.{self.group} "{key[1]}" is invalid: '
                                                   "metadata.resourceVersion: Invalid value: 0x0: must be specified "
                                                   "for an update")
        if version != old["metadata"]["resourceVersion"]:
            return 409, status_doc(409, "Conflict", f'Operation cannot be fulfilled on {self._qualified()} '
                                                    f'"{key[1]}": the object has been modified; please apply your '
                                                    "changes to the latest version and try again")
        obj.pop("status", None)
        for server_set in ("uid", "creationTimestamp", "deletionTimestamp", "generation"):
            if server_set in old["metadata"]:
                obj["metadata"][server_set] = old["metadata"][server_set]
            else:
                obj["metadata"].pop(server_set, None)
        if obj.get("spec") != old.get("spec"):
            obj["metadata"]["generation"] = old["metadata"]["generation"] + 1
        refused = self._check("UPDATE", obj, old)
        if refused:
            return refused
        if dry:
            return 200, obj
        obj["metadata"]["resourceVersion"] = self._bump()
        self.objects[key] = obj
        self.stored(key, obj, old)
        return 200, copy.deepcopy(obj)

    def _delete(self, key, obj: dict, policy: str, dry: bool) -> tuple[int, dict]:
        finalizers = list(obj["metadata"].get("finalizers") or [])
        if policy == "Foreground" and "foregroundDeletion" not in finalizers:
            finalizers.append("foregroundDeletion")
        if dry:
            return 200, copy.deepcopy(obj)
        if not finalizers:
            self._remove(key)
            return 200, status_doc(200, "Success", f'{self._qualified()} "{key[1]}" deleted')
        obj["metadata"]["finalizers"] = finalizers
        obj["metadata"].setdefault("deletionTimestamp", now_iso())
        obj["metadata"]["resourceVersion"] = self._bump()
        self._removing.setdefault(key, self.finalize_reads)
        return 200, copy.deepcopy(obj)

    def _tick(self, key) -> None:
        """Time passes for a terminating object: its controller removes the finalizers after a few requests."""
        if key in self._removing:
            self._removing[key] -= 1
            if self._removing[key] < 0:
                self._remove(key)

    def _remove(self, key) -> None:
        self.objects.pop(key, None)
        self._removing.pop(key, None)
        self.gone(key)

    def writes(self) -> list[dict]:
        return [r for r in self.requests if r["method"] != "GET"]


def serve_fake(fake) -> ThreadingHTTPServer:
    """``fake`` (anything with ``handle`` and ``requests``) on 127.0.0.1, a free port, in a thread."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _do(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            fake.requests.append({"method": self.command, "path": url.path, "query": query, "body": body,
                                  "authorization": self.headers.get("Authorization")})
            status, doc, warnings = fake.handle(self.command, url.path, body, query)
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for warning in warnings:
                escaped = warning.replace('"', '\\"')
                self.send_header("Warning", f'299 - "{escaped}"')
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _do

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


@pytest.fixture
def api(monkeypatch):
    """``start(fake)`` serves a fake (or a request handler class) on loopback and returns its URL; proxies are
    off for the client; every server is stopped at the end of the test."""
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers = []

    def start(fake) -> str:
        if isinstance(fake, type) and issubclass(fake, BaseHTTPRequestHandler):
            server = ThreadingHTTPServer(("127.0.0.1", 0), fake)
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        else:
            server = serve_fake(fake)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
