"""The Kubernetes API calls for custom objects (InferenceServices, TrainJobs): get, create, replace, delete.

Connection settings, first match wins: an explicit ``host`` (with ``token``), the pod's
service account when running in a cluster (``KUBERNETES_SERVICE_HOST``: a KFP deploy task),
else the kube-config file (``KUBECONFIG`` or ``~/.kube/config``, optional ``context``).
Updates are full replacements carrying the ``resourceVersion`` that was read, so a
concurrent change is a conflict (retried from a fresh read), never lost.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from saft.serving.kserve import GROUP, PLURAL, VERSION

REQUEST_TIMEOUT_S = 30


class KubeError(RuntimeError):
    """A Kubernetes API call failed; the message names the call and the server's reason."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


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
        config.load_incluster_config(client_configuration=cfg)
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
                 kubeconfig: str | None = None, context: str | None = None, verify_ssl: bool = True):
        from kubernetes import client

        self.namespace = namespace
        self.where = host or "the cluster"
        self.api = client.CustomObjectsApi(client.ApiClient(_configuration(host, token, kubeconfig, context,
                                                                           verify_ssl)))

    def _call(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(self.group, self.version, self.namespace, self.plural, *args,
                      _request_timeout=REQUEST_TIMEOUT_S, **kwargs)
        except ApiException as exc:
            try:
                message = json.loads(exc.body or "{}").get("message") or exc.reason
            except (ValueError, AttributeError):
                message = exc.reason
            raise KubeError(f"{what} {self.namespace}/{self.plural} on {self.where}: HTTP {exc.status} {message}",
                            exc.status) from None
        except (HTTPError, OSError) as exc:
            raise KubeError(f"{what} {self.namespace}/{self.plural}: cannot reach the Kubernetes API at {self.where} "
                            f"({type(exc).__name__}: {exc})") from None

    def get(self, name: str) -> dict | None:
        try:
            return self._call(f"reading {self.kind} {name} in", self.api.get_namespaced_custom_object, name)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, manifest: dict) -> dict:
        name = manifest["metadata"]["name"]
        return self._call(f"creating {self.kind} {name} in", self.api.create_namespaced_custom_object, manifest)

    def replace(self, manifest: dict) -> dict:
        name = manifest["metadata"]["name"]
        return self._call(f"updating {self.kind} {name} in", self.api.replace_namespaced_custom_object, name,
                          manifest)

    def update(self, name: str, change: Callable[[dict], None], attempts: int = 5) -> dict:
        """Read, ``change(obj)`` in place, write back; a conflicting concurrent write is retried."""
        for attempt in range(attempts):
            current = self.get(name)
            if current is None:
                raise KubeError(f"{self.kind} {self.namespace}/{name} disappeared during the rollout", 404)
            change(current)
            current.pop("status", None)
            try:
                return self.replace(current)
            except KubeError as exc:
                if exc.status != 409 or attempt == attempts - 1:
                    raise

    def delete(self, name: str) -> None:
        try:
            self._call(f"deleting {self.kind} {name} in", self.api.delete_namespaced_custom_object, name)
        except KubeError as exc:
            if exc.status != 404:
                raise


class InferenceServices(CustomObjects):
    """KServe InferenceServices of one namespace."""

    group, version, plural, kind = GROUP, VERSION, PLURAL, "InferenceService"
