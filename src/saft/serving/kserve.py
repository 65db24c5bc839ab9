"""The KServe InferenceService of a registered model: the project image serving the pyfunc.

:func:`render` builds a ``serving.kserve.io/v1beta1`` InferenceService whose predictor is a
custom container (``kserve-container``) running ``saft serve models:/NAME/VERSION`` on
port 8080, with the MLflow and S3 secrets as environment, CPU/memory/GPU requests and
limits, GPU node placement, and readiness (``/v2/health/ready``) and liveness
(``/v2/health/live``) probes. The deployment mode is ``Serverless``: KServe's canary
rollout (``canaryTrafficPercent``) exists only there; tag routing is on so the canary
revision gets its own URL for a smoke test.

:func:`validate` checks a manifest against :data:`SCHEMA`, a JSON Schema written from
KServe's v1beta1 API (``InferenceServiceSpec``, ``PredictorSpec`` = the Kubernetes
``PodSpec`` inline plus ``ComponentExtensionSpec``) and the core/v1 types it embeds
(Container, Probe, ResourceRequirements, Toleration), for the fields this module
renders. It is strict (``additionalProperties: false``) because the API server prunes
fields its structural schema does not know: a misspelt field would vanish silently
instead of failing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
API_VERSION = f"{GROUP}/{VERSION}"
CONTAINER = "kserve-container"  # the name KServe looks for in a custom predictor
PORT = 8080
MODEL_LABEL = "saft.io/registered-model"
VERSION_LABEL = "saft.io/model-version"
MODEL_URI_ANNOTATION = "saft.io/model-uri"
# KServe's InferenceService name format (pkg/apis/serving/v1beta1/inference_service_validation.go)
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# Knative names the predictor's revisions NAME-predictor-00001; a Kubernetes name has at most 63 characters
MAX_NAME = 63 - len("-predictor-00001")
_QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


@dataclass
class PredictorSettings:
    """What the cluster needs to run the predictor; every field is a deploy-step parameter."""

    image: str = "ghcr.io/saft-pipeline/saft:latest"  # the project image (saft.orchestration's default)
    namespace: str = "default"
    cpu: str = "2"
    memory: str = "8Gi"
    memory_limit: str = "16Gi"
    gpu_count: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    gpu_node_label: tuple[str, str] = ("nvidia.com/gpu.present", "true")
    min_replicas: int = 1
    max_replicas: int = 1
    secrets: tuple[str, ...] = ("saft-mlflow", "saft-s3")  # envFrom: MLFLOW_TRACKING_URI, AWS_* keys
    service_account: str = ""
    max_batch: int = 32
    precision: str = "auto"
    timeout_s: int = 60  # per request, at the KServe router
    extra_env: dict[str, str] = field(default_factory=dict)


def service_name(model_name: str) -> str:
    """A valid InferenceService name for a registered model name (``saft_ViT.B`` -> ``saft-vit-b``)."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"saft-{name}".rstrip("-")
    return name[:MAX_NAME].rstrip("-")


def predictor(model_uri: str, model_name: str, settings: PredictorSettings) -> dict:
    """The ``spec.predictor`` of the InferenceService (without canaryTrafficPercent)."""
    resources = {"requests": {"cpu": settings.cpu, "memory": settings.memory},
                 "limits": {"memory": settings.memory_limit}}
    if settings.gpu_count:
        resources["requests"][settings.gpu_resource] = str(settings.gpu_count)
        resources["limits"][settings.gpu_resource] = str(settings.gpu_count)
    probe = {"periodSeconds": 10, "timeoutSeconds": 5}
    env = [{"name": "SAFT_SERVE_DEVICE", "value": "cuda" if settings.gpu_count else "cpu"},
           {"name": "PYTHONUNBUFFERED", "value": "1"}]
    env += [{"name": k, "value": str(v)} for k, v in sorted(settings.extra_env.items())]
    container = {
        "name": CONTAINER,
        "image": settings.image,
        "command": ["saft", "serve"],
        "args": [model_uri, "--host", "0.0.0.0", "--port", str(PORT), "--name", model_name,
                 "--max-batch", str(settings.max_batch), "--precision", settings.precision],
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "envFrom": [{"secretRef": {"name": s, "optional": True}} for s in settings.secrets],
        "resources": resources,
        # ready only once the base is loaded and the model warmed up; a large base takes minutes
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": PORT}, "initialDelaySeconds": 5,
                           "failureThreshold": 3, **probe},
        # live while loading (the port opens first); a failed load exits the process instead
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": PORT}, "initialDelaySeconds": 30,
                          "failureThreshold": 6, **probe},
    }
    spec = {"minReplicas": settings.min_replicas, "maxReplicas": settings.max_replicas,
            "timeout": settings.timeout_s, "containers": [container]}
    if settings.gpu_count:
        spec["nodeSelector"] = {settings.gpu_node_label[0]: settings.gpu_node_label[1]}
        spec["tolerations"] = [{"key": settings.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    return spec


def render(name: str, model_name: str, version: str, settings: PredictorSettings) -> dict:
    """The InferenceService serving ``models:/model_name/version`` (validated)."""
    model_uri = f"models:/{model_name}/{version}"
    manifest = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": {MODEL_LABEL: service_name(model_name), VERSION_LABEL: str(version)},
            "annotations": {"serving.kserve.io/deploymentMode": "Serverless",
                            "serving.kserve.io/enable-tag-routing": "true",
                            MODEL_URI_ANNOTATION: model_uri},
        },
        "spec": {"predictor": predictor(model_uri, model_name, settings)},
    }
    validate(manifest)
    return manifest


_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY_MAP = {"type": "object", "additionalProperties": {"anyOf": [
    {"type": "integer", "minimum": 0}, {"type": "string", "pattern": _QUANTITY}]}}
_POSITIVE = {"type": "integer", "minimum": 1}
_NON_NEGATIVE = {"type": "integer", "minimum": 0}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_PROBE = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "httpGet": {"type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"path": {"type": "string", "pattern": "^/"}, "port": {"anyOf": [_PORT, {
                        "type": "string", "pattern": "^[a-z0-9-]{1,15}$"}]},
                        "scheme": {"enum": ["HTTP", "HTTPS"]}}},
        "initialDelaySeconds": _NON_NEGATIVE, "periodSeconds": _POSITIVE, "timeoutSeconds": _POSITIVE,
        "successThreshold": _POSITIVE, "failureThreshold": _POSITIVE,
    },
    "required": ["httpGet"],
}
_CONTAINER = {
    "type": "object", "additionalProperties": False, "required": ["name", "image"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "image": {"type": "string", "minLength": 1},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "ports": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                             "required": ["containerPort"],
                                             "properties": {"containerPort": _PORT, "name": {"type": "string"},
                                                            "protocol": {"enum": ["TCP", "UDP", "SCTP"]}}}},
        "env": {"type": "array", "items": {"type": "object", "additionalProperties": False, "required": ["name"],
                                           "properties": {"name": {"type": "string", "minLength": 1},
                                                          "value": {"type": "string"}}}},
        "envFrom": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
            "secretRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                          "properties": {"name": {"type": "string"}, "optional": {"type": "boolean"}}},
            "configMapRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                             "properties": {"name": {"type": "string"}, "optional": {"type": "boolean"}}}}}},
        "resources": {"type": "object", "additionalProperties": False,
                      "properties": {"requests": _QUANTITY_MAP, "limits": _QUANTITY_MAP}},
        "readinessProbe": _PROBE,
        "livenessProbe": _PROBE,
    },
}
_PREDICTOR = {
    "type": "object", "additionalProperties": False, "required": ["containers"],
    "properties": {
        # ComponentExtensionSpec
        "minReplicas": _NON_NEGATIVE, "maxReplicas": _NON_NEGATIVE, "scaleTarget": _POSITIVE,
        "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
        "containerConcurrency": _NON_NEGATIVE, "timeout": _POSITIVE,
        "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
        "labels": _STRING_MAP, "annotations": _STRING_MAP,
        # PodSpec (inline)
        "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
        "nodeSelector": _STRING_MAP,
        "tolerations": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
            "key": {"type": "string"}, "operator": {"enum": ["Exists", "Equal"]}, "value": {"type": "string"},
            "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
            "tolerationSeconds": {"type": "integer"}}}},
        "serviceAccountName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
    },
}
SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": API_VERSION},
        "kind": {"const": KIND},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name", "namespace"], "properties": {
            "name": {"type": "string", "pattern": NAME_PATTERN, "maxLength": MAX_NAME},
            "namespace": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
            "labels": {"type": "object", "additionalProperties": {
                "type": "string", "maxLength": 63, "pattern": "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}},
            "annotations": _STRING_MAP,
            "resourceVersion": {"type": "string"},
        }},
        "spec": {"type": "object", "additionalProperties": False, "required": ["predictor"],
                 "properties": {"predictor": _PREDICTOR}},
    },
}


class ManifestError(ValueError):
    """A rendered InferenceService that the cluster would reject or silently prune."""


def validate(manifest: dict) -> dict:
    """Check ``manifest`` against :data:`SCHEMA` and KServe's own rules; returns it unchanged."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}" for e in errors[:10]]
        raise ManifestError("InferenceService manifest is invalid:\n  " + "\n  ".join(lines))
    spec = manifest["spec"]["predictor"]
    if spec.get("maxReplicas") and spec.get("minReplicas", 1) > spec["maxReplicas"]:
        raise ManifestError("spec.predictor: 'MinReplicas' cannot be greater than MaxReplicas")
    if not any(c["name"] == CONTAINER for c in spec["containers"]):
        raise ManifestError(f"spec.predictor.containers: a custom predictor needs a container named {CONTAINER!r}")
    return manifest
