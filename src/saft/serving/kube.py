"""The Kubernetes API calls for custom objects (InferenceServices, TrainJobs): get, create, replace, delete.

Connection settings, first match wins: an explicit ``host`` (with ``token``), the pod's
service account when running in a cluster (``KUBERNETES_SERVICE_HOST``: a KFP deploy task),
else the kube-config file (``KUBECONFIG`` or ``~/.kube/config``, optional ``context``).

What the API server does, and this module relies on (Kubernetes >= 1.27):

* every write is sent with ``fieldValidation=Strict``: a field the object's schema does not
  know fails the request (400, ``strict decoding error: unknown field ...``) instead of being
  dropped with a warning, so the cluster, not a hand-kept copy of its schema, validates;
* ``dry_run=True`` sends ``dryRun=All``: the request goes through defaulting, schema
  validation and every admission webhook (KServe's validator included) and nothing is stored;
* updates are full replacements carrying the ``resourceVersion`` that was read: a concurrent
  change is a 409 Conflict (retried from a fresh read), a PUT without it a 422;
* a deleted object with finalizers stays, with ``metadata.deletionTimestamp``, until its
  controller removes them; creating one of the same name meanwhile is a 409 whose message
  starts ``object is being deleted`` (:meth:`CustomObjects.create_when_free` waits for it).

Warnings the server sends (``Warning`` headers: deprecations, admission webhooks) are kept
in :attr:`CustomObjects.warnings`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

from saft.serving.kserve import GROUP, PLURAL, VERSION

REQUEST_TIMEOUT_S = 30
FIELD_VALIDATION = "Strict"
_WARNING = re.compile(r'\d{3} \S+ "((?:[^"\\]|\\.)*)"')


class KubeError(RuntimeError):
    """A Kubernetes API call failed; the message names the call and the server's reason.

    ``status`` is the HTTP status (None when the API was not reached at all), ``reason`` the
    Status object's reason (``AlreadyExists``, ``Conflict``, ``Invalid``, ``BadRequest``, ...)
    and ``server_message`` its message.
    """

    def __init__(self, message: str, status: int | None = None, reason: str = "", server_message: str = ""):
        super().__init__(message)
        self.status, self.reason, self.server_message = status, reason, server_message

    @property
    def unreachable(self) -> bool:
        return self.status is None

    @property
    def terminating(self) -> bool:
        """A create refused because an object of that name is still being deleted."""
        return self.status == 409 and self.server_message.startswith("object is being deleted")


def terminating(obj: dict | None) -> bool:
    """Whether ``obj`` is being deleted (its finalizers still run)."""
    return bool(obj and (obj.get("metadata") or {}).get("deletionTimestamp"))


def _configuration(host: str | None, token: str | None, kubeconfig: str | None, context: str | None,
                   verify_ssl: bool):
    from kubernetes import client, config

    if host:
        cfg = client.Configuration(host=host.rstrip("/"))
        cfg.verify_ssl = verify_ssl
        if token:
            cfg.api_key = {"authorization": token}
            cfg.api_key_prefix = {"authorization": "Bearer"}
        return cfg
    cfg = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException as exc:
            raise KubeError(f"in a pod, but without a service-account token to call the Kubernetes API ({exc}); "
                            "mount one (automountServiceAccountToken) or give --kubeconfig") from None
    else:
        try:
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        except (config.ConfigException, OSError) as exc:
            raise KubeError(f"no Kubernetes API to talk to: not in a cluster and no usable kube-config ({exc}); "
                            "give --kube-host (and KUBE_TOKEN) or --kubeconfig") from None
    return cfg


class CustomObjects:
    """Namespaced custom objects of one kind (a subclass names its group, version, plural and kind)."""

    group = version = plural = kind = ""

    def __init__(self, namespace: str, *, host: str | None = None, token: str | None = None,
                 kubeconfig: str | None = None, context: str | None = None, verify_ssl: bool = True,
                 log: Callable[[str], None] = lambda _msg: None):
        from kubernetes import client

        self.namespace = namespace
        self.where = host or "the cluster"
        self.warnings: list[str] = []
        self._log = log
        self.client = client.ApiClient(_configuration(host, token, kubeconfig, context, verify_ssl))
        self.api = client.CustomObjectsApi(self.client)

    def _request(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        """``fn(*args)`` with the server's Status turned into a KubeError and its warnings kept."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            data, _status, headers = fn(*args, _request_timeout=REQUEST_TIMEOUT_S, _return_http_data_only=False,
                                        **kwargs)
        except ApiException as exc:
            try:
                status = json.loads(exc.body or "{}")
            except (ValueError, TypeError):
                status = {}
            message = status.get("message") or exc.reason
            raise KubeError(f"{what} on {self.where}: HTTP {exc.status} {message}", exc.status,
                            status.get("reason") or "", message or "") from None
        except (HTTPError, OSError) as exc:
            raise KubeError(f"{what}: cannot reach the Kubernetes API at {self.where} "
                            f"({type(exc).__name__}: {exc})") from None
        for warning in _WARNING.findall((headers or {}).get("Warning") or ""):
            text = warning.replace('\\"', '"')
            self.warnings.append(text)
            self._log(f"kubernetes: warning from the API server ({what}): {text}")
        return data

    def _call(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        return self._request(f"{what} {self.namespace}/{self.plural}", fn, self.group, self.version,
                             self.namespace, self.plural, *args, **kwargs)

    @staticmethod
    def _write_options(dry_run: bool) -> dict:
        return {"field_validation": FIELD_VALIDATION, **({"dry_run": "All"} if dry_run else {})}

    def get(self, name: str) -> dict | None:
        try:
            return self._call(f"reading {self.kind} {name} in", self.api.get_namespaced_custom_object_with_http_info,
                              name)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, manifest: dict, *, dry_run: bool = False) -> dict:
        name = manifest["metadata"]["name"]
        verb = "validating (dry run) the creation of" if dry_run else "creating"
        return self._call(f"{verb} {self.kind} {name} in", self.api.create_namespaced_custom_object_with_http_info,
                          manifest, **self._write_options(dry_run))

    def replace(self, manifest: dict, *, dry_run: bool = False) -> dict:
        name = manifest["metadata"]["name"]
        verb = "validating (dry run) the update of" if dry_run else "updating"
        return self._call(f"{verb} {self.kind} {name} in", self.api.replace_namespaced_custom_object_with_http_info,
                          name, manifest, **self._write_options(dry_run))

    def update(self, name: str, change: Callable[[dict], None], *, attempts: int = 5, dry_run: bool = False) -> dict:
        """Read, ``change(obj)`` in place, write back with the read ``resourceVersion``; a 409 is retried."""
        for attempt in range(attempts):
            current = self.get(name)
            if current is None:
                raise KubeError(f"{self.kind} {self.namespace}/{name} disappeared while it was being updated", 404,
                                "NotFound")
            change(current)
            current.pop("status", None)
            try:
                return self.replace(current, dry_run=dry_run)
            except KubeError as exc:
                if exc.status != 409 or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def delete(self, name: str, *, propagation: str = "Background") -> dict | None:
        """Delete ``name`` (absent is fine); returns the object while finalizers hold it, else None.

        ``propagation="Foreground"`` keeps the object (terminating) until the garbage
        collector has deleted what it owns (a TrainJob's JobSet and pods).
        """
        try:
            doc = self._call(f"deleting {self.kind} {name} in",
                             self.api.delete_namespaced_custom_object_with_http_info, name,
                             propagation_policy=propagation)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return doc if terminating(doc) else None

    def wait_gone(self, name: str, timeout_s: float, *, poll_s: float = 2.0,
                  clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> bool:
        """Wait until ``name`` no longer exists (its finalizers done); False after ``timeout_s``."""
        deadline = clock() + timeout_s
        while self.get(name) is not None:
            if clock() >= deadline:
                return False
            sleep(poll_s)
        return True

    def create_when_free(self, manifest: dict, timeout_s: float, *, poll_s: float = 2.0,
                         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                         log: Callable[[str], None] = lambda _msg: None) -> dict:
        """Create ``manifest``; while an object of its name is still being deleted, wait for it to go."""
        name = manifest["metadata"]["name"]
        deadline = clock() + timeout_s
        while True:
            try:
                return self.create(manifest)
            except KubeError as exc:
                if not exc.terminating:
                    raise
                if clock() >= deadline:
                    raise KubeError(f"{self.kind} {self.namespace}/{name} was still being deleted (finalizers) after "
                                    f"{timeout_s:g} s; it cannot be created again until it is gone "
                                    f"(kubectl get {self.plural}.{self.group} -n {self.namespace} {name} -o yaml "
                                    "shows which finalizers remain)", 409, exc.reason, exc.server_message) from None
                log(f"{self.kind} {self.namespace}/{name} is still being deleted: waiting to create it again")
                sleep(poll_s)


class InferenceServices(CustomObjects):
    """KServe InferenceServices of one namespace, and what runs them: Knative Revisions (Knative mode) or
    Deployments (Standard mode)."""

    group, version, plural, kind = GROUP, VERSION, PLURAL, "InferenceService"

    def revision(self, name: str) -> dict | None:
        """The Knative Revision ``name`` (``serving.knative.dev/v1``) of a Knative-mode service, or None."""
        try:
            return self._request(f"reading Knative Revision {self.namespace}/{name}",
                                 self.api.get_namespaced_custom_object_with_http_info, "serving.knative.dev", "v1",
                                 self.namespace, "revisions", name)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def deployment(self, name: str) -> dict | None:
        """The ``apps/v1`` Deployment ``name`` (as JSON), or None when there is none."""
        from kubernetes import client

        api = client.AppsV1Api(self.client)
        try:
            response = self._request(f"reading Deployment {self.namespace}/{name}",
                                     api.read_namespaced_deployment_with_http_info, name, self.namespace,
                                     _preload_content=False)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(response.data)
