"""The KServe InferenceService of a registered model: the project image serving the pyfunc.

:func:`render` builds a ``serving.kserve.io/v1beta1`` InferenceService whose predictor is a
custom container (``kserve-container``) running ``saft serve models:/NAME/VERSION --name
SERVICE`` on port 8080, with the MLflow and S3 secrets as environment, CPU/memory/GPU
requests and limits, GPU node placement, and readiness (``/v2/health/ready``) and liveness
(``/v2/health/live``) probes. The model is served under the InferenceService's own name, so
``/v1/models/SERVICE:predict`` and ``/v2/models/SERVICE/infer`` are the URLs a KServe user
calls.

Deployment modes (annotation ``serving.kserve.io/deploymentMode``; KServe >= 0.16 names,
kserve/kserve#4608, which also made ``Standard`` the default):

* ``Knative`` (formerly ``Serverless``): Knative revisions. KServe's canary rollout
  (``canaryTrafficPercent`` between the last rolled-out revision and the latest one) exists
  only here; tag routing gives the new revision its own URL for a smoke prediction.
* ``Standard`` (formerly ``RawDeployment``): a Kubernetes Deployment, updated in place by a
  rolling update. ``canaryTrafficPercent`` does nothing there, and the ``spec.canary``
  entries KServe 0.20 added for this mode need a predictor with a storage URI or model
  format, which a custom container has not: this mode deploys without a canary.

A service's mode cannot change after it was created (KServe's webhook refuses the update).

Nothing here checks the manifest against a copy of KServe's schema: the API server does
that (``fieldValidation=Strict``, ``dryRun=All`` with KServe's admission webhook; see
:mod:`saft.serving.kube`). :func:`render` only refuses what it is given wrongly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from saft.config import check, setting

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
API_VERSION = f"{GROUP}/{VERSION}"
CONTAINER = "kserve-container"  # the name KServe looks for in a custom predictor
PORT = 8080
MODEL_LABEL = "saft.io/registered-model"
VERSION_LABEL = "saft.io/model-version"
MODEL_URI_ANNOTATION = "saft.io/model-uri"
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
TAG_ROUTING_ANNOTATION = "serving.kserve.io/enable-tag-routing"
KNATIVE, STANDARD = "Knative", "Standard"
MODES = (KNATIVE, STANDARD)
LEGACY_MODES = {"Serverless": KNATIVE, "RawDeployment": STANDARD}  # KServe < 0.16; still read by later releases
# KServe's InferenceService name format (pkg/apis/serving/v1beta1/inference_service_validation.go)
NAME_PATTERN = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Knative names the predictor's revisions NAME-predictor-00001; a Kubernetes name has at most 63 characters
MAX_NAME = 63 - len("-predictor-00001")


@dataclass
class PredictorSettings:
    """What the cluster needs to run the predictor; every field is a deploy-step parameter."""

    image: str = setting("", help="predictor image (the project image you pushed); empty: $SAFT_IMAGE, or the "
                                  "pipeline's own image in the deploy task")
    namespace: str = setting("default", help="namespace of the InferenceService")
    deployment_mode: str = setting(KNATIVE, choices=MODES,
                                   help="KServe's deployment mode (names since KServe 0.16): Knative has the canary; "
                                        "Standard has none (set canary_percent 0: the predictor is replaced in "
                                        "place); fixed once the service exists")
    cpu: str = setting("2", help="predictor CPU request")
    memory: str = setting("8Gi", help="predictor memory request")
    memory_limit: str = setting("16Gi", help="predictor memory limit")
    gpu_count: int = setting(1, minimum=0, help="GPUs per predictor replica; 0 serves on the CPU")
    gpu_resource: str = setting("nvidia.com/gpu", help="GPU resource name")
    gpu_node_label: tuple[str, str] = setting(("nvidia.com/gpu.present", "true"), metavar="LABEL",
                                              help="node selector (key value) of GPU predictors")
    min_replicas: int = setting(1, minimum=0, help="minimum replicas")
    max_replicas: int = setting(1, minimum=1, help="maximum replicas")
    secrets: tuple[str, ...] = setting(("saft-mlflow", "saft-s3"), flag="--secret", metavar="NAME",
                                       help="secrets passed to the predictor as environment (MLFLOW_TRACKING_URI, "
                                            "AWS_* keys)")
    service_account: str = setting("", help="service account of the predictor pods")
    max_batch: int = setting(32, minimum=1, help="images per forward pass")
    precision: str = setting("auto", choices=("auto", "fp32", "bf16"),
                             help="image tower precision: auto = bf16 autocast on CUDA, fp32 on CPU")
    timeout_s: int = setting(60, minimum=1, help="seconds per request at KServe's router")
    extra_env: dict[str, str] = setting(factory=dict, cli=False, help="more environment of the predictor")

    def __post_init__(self) -> None:
        check(self)
        self.gpu_node_label, self.secrets = tuple(self.gpu_node_label), tuple(self.secrets)


def normalize_mode(mode: str) -> str:
    """``Knative`` or ``Standard`` for a current or legacy mode name; "" for none; ValueError otherwise."""
    mode = LEGACY_MODES.get(mode, mode)
    if mode and mode not in MODES:
        raise ValueError(f"deployment mode {mode!r}: KServe's modes are {' and '.join(MODES)} (Serverless and "
                         "RawDeployment are their names before KServe 0.16)")
    return mode


def mode_of(isvc: dict) -> str:
    """The mode an existing InferenceService runs in: what KServe recorded in its status, else its
    annotation; "" when neither says (the cluster's default, ``Standard`` from KServe 0.16)."""
    recorded = (isvc.get("status") or {}).get("deploymentMode") or ""
    annotated = ((isvc.get("metadata") or {}).get("annotations") or {}).get(MODE_ANNOTATION) or ""
    for value in (recorded, annotated):
        if LEGACY_MODES.get(value, value) in MODES:
            return LEGACY_MODES.get(value, value)
    return ""


def service_name(model_name: str) -> str:
    """A valid InferenceService name for a registered model name (``saft_ViT.B`` -> ``saft-vit-b``)."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"saft-{name}".rstrip("-")
    return name[:MAX_NAME].rstrip("-")


def predictor(model_uri: str, served_name: str, settings: PredictorSettings) -> dict:
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
        "args": [model_uri, "--host", "0.0.0.0", "--port", str(PORT), "--name", served_name,
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
    """The InferenceService ``name`` serving ``models:/model_name/version`` under the name ``name``."""
    if not NAME_PATTERN.match(name) or len(name) > MAX_NAME:
        raise ValueError(f"InferenceService name {name!r}: KServe needs lower-case letters, digits and '-', "
                         f"starting with a letter, at most {MAX_NAME} characters (so Knative's "
                         f"{name[:8]}...-predictor-00001 fits 63); give --service NAME")
    mode = normalize_mode(settings.deployment_mode) or KNATIVE
    model_uri = f"models:/{model_name}/{version}"
    annotations = {MODE_ANNOTATION: mode, MODEL_URI_ANNOTATION: model_uri}
    if mode == KNATIVE:
        annotations[TAG_ROUTING_ANNOTATION] = "true"  # the canary revision gets its own URL
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": {MODEL_LABEL: service_name(model_name), VERSION_LABEL: str(version)},
            "annotations": annotations,
        },
        "spec": {"predictor": predictor(model_uri, name, settings)},
    }
