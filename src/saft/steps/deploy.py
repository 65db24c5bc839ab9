"""The deploy step: a registered version (by default the ``champion``) onto KServe, by canary.

``deploy_step(cfg, out_dir)`` resolves ``cfg.model_name`` at ``cfg.version`` (an alias such
as ``champion`` or a version number) in the MLflow registry, renders its InferenceService
(``saft.serving.kserve``), writes it to ``out_dir/inferenceservice.json``, and rolls it out
(``saft.serving.rollout``): created when there is none, left alone when that version already
serves all traffic, else a canary promoted to 100% when ready and healthy or rolled back.
The outcome is written to the version's tags before the step returns (``saft.deploy.status``,
``.reason``, ``.service``, ``.mode``, ``.timestamp``, ``.previous_version``,
``.canary_percent``; a replaced version gets ``saft.deploy.replaced_by``) and to
``out_dir/deploy.json``.

``dry_run`` applies nothing. When a cluster is reachable, the rollout's first write (the
creation, or the canary update of the running service) is sent as a server-side dry run, so
the API server's schema (strict field validation) and KServe's admission webhook judge it:
``validated: api-server``. With no cluster to ask (no kube-config, the API unreachable,
KServe not installed, or no right to write InferenceServices), the manifest is only rendered:
``validated: none``, with the reason. A manifest the cluster refuses is an error either way.

Calling it after every register step is safe: when the gate did not move the champion,
the champion is already deployed and nothing changes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from saft.images import resolve_image
from saft.io import write_json
from saft.serving.kserve import PredictorSettings
from saft.serving.kube import KubeError
from saft.serving.rollout import RolloutConfig
from saft.layout import DEPLOYMENT

DEPLOY_FILE = DEPLOYMENT.deploy
MANIFEST_FILE = DEPLOYMENT.manifest
DEPLOY_SCHEMA = "saft-deploy/1"
STATUS_TAG, REASON_TAG, SERVICE_TAG = "saft.deploy.status", "saft.deploy.reason", "saft.deploy.service"
TIME_TAG, PREVIOUS_TAG, CANARY_TAG = "saft.deploy.timestamp", "saft.deploy.previous_version", "saft.deploy.canary_percent"
REPLACED_BY_TAG, MODE_TAG = "saft.deploy.replaced_by", "saft.deploy.mode"
RENDERED = "rendered"


@dataclass
class DeployConfig:
    """What to deploy (registry), where and how it runs (``predictor``), how it is rolled out (``rollout``)."""

    model_name: str = "saft-tiny"
    version: str = "champion"  # an alias or a version number
    service: str = ""  # InferenceService name; empty: derived from model_name
    predictor: PredictorSettings = field(default_factory=PredictorSettings)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kube_host: str = ""  # empty: the pod's service account in a cluster, else the kube-config
    kubeconfig: str = ""
    kube_context: str = ""
    dry_run: bool = False


def _resolve(client, cfg: DeployConfig):
    from saft.tracking.promotion import get_alias

    if str(cfg.version).isdigit():
        return client.get_model_version(cfg.model_name, str(cfg.version))
    return get_alias(client, cfg.model_name, str(cfg.version))


def _record(client, cfg: DeployConfig, version: str, result, service: str) -> None:
    tags = {STATUS_TAG: result.status, REASON_TAG: result.reason[:5000], SERVICE_TAG: service, MODE_TAG: result.mode,
            TIME_TAG: datetime.now(timezone.utc).isoformat(timespec="seconds"),
            CANARY_TAG: str(cfg.rollout.canary_percent),
            PREVIOUS_TAG: str(result.previous_version or "none")}
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    previous = result.previous_version
    if result.status == "promoted" and previous and previous != version and previous.isdigit():
        client.set_model_version_tag(cfg.model_name, previous, REPLACED_BY_TAG, version)


def _no_cluster(exc: KubeError) -> str | None:
    """Why a dry run cannot ask the cluster (then the manifest is only rendered), or None for a refusal."""
    if exc.unreachable:
        return str(exc)
    if exc.status == 404 and "could not find the requested resource" in exc.server_message:
        return f"KServe's InferenceService API is not installed on the cluster ({exc})"
    if exc.status == 403 and not exc.server_message.startswith("admission webhook"):
        return f"no right to write InferenceServices there ({exc})"
    return None


def _clients(cfg: DeployConfig, log):
    from saft.serving.kube import InferenceServices

    return InferenceServices(cfg.predictor.namespace, host=cfg.kube_host or None, token=os.environ.get("KUBE_TOKEN"),
                             kubeconfig=cfg.kubeconfig or None, context=cfg.kube_context or None, log=log)


def deploy_step(cfg: DeployConfig, out_dir: str | Path, *, isvcs=None, smoke="default", log=print) -> dict:
    """Deploy ``cfg.model_name`` at ``cfg.version``; returns what ``deploy.json`` holds.

    ``isvcs`` replaces the Kubernetes client (a ``saft.serving.kube.InferenceServices``)
    and ``smoke`` the smoke prediction (a callable ``(url, served_name, version)``, or None
    to skip it); both default to the real ones.
    """
    from saft.serving.kserve import MODE_ANNOTATION, normalize_mode, render, service_name
    from saft.serving.rollout import Rollout, check_mode, smoke_request
    from saft.tracking.config import make_client, probe, resolve_config, tracking_call, tracking_enabled
    from saft.tracking.registry import check_model_name

    check_model_name(cfg.model_name)
    check_mode(normalize_mode(cfg.predictor.deployment_mode), cfg.rollout.canary_percent)
    cfg = replace(cfg, predictor=replace(cfg.predictor, image=resolve_image(cfg.predictor.image)))
    if not tracking_enabled():
        raise ValueError("deploy needs the MLflow registry, but tracking is off (SAFT_TRACKING=off)")
    config = resolve_config()
    probe(config)
    client = make_client(config)
    with tracking_call(config, f"resolving {cfg.model_name}@{cfg.version}"):
        mv = _resolve(client, cfg)
    if mv is None:
        raise ValueError(f"registered model {cfg.model_name!r} has no alias {cfg.version!r} on {config.where}: "
                         "nothing to deploy "
                         "(register and promote a version first, or give a version number)")
    version = str(mv.version)
    name = cfg.service or service_name(cfg.model_name)
    manifest = render(name, cfg.model_name, version, cfg.predictor)
    out = Path(out_dir)
    write_json(out / MANIFEST_FILE, manifest)
    doc = {"schema": DEPLOY_SCHEMA, "model_name": cfg.model_name, "version": version,
           "requested": str(cfg.version), "service": f"{cfg.predictor.namespace}/{name}",
           "mode": manifest["metadata"]["annotations"][MODE_ANNOTATION], "config": asdict(cfg),
           "manifest": MANIFEST_FILE}
    smoke = smoke_request if smoke == "default" else smoke
    if cfg.dry_run:
        try:
            isvcs = isvcs if isvcs is not None else _clients(cfg, log)
            write = Rollout(isvcs, manifest, cfg.rollout, smoke=smoke, log=log).validate()
        except KubeError as exc:
            why = _no_cluster(exc)
            if why is None:
                raise ValueError(f"the cluster refused the InferenceService {doc['service']} (dry run): {exc}") \
                    from None
            doc.update(status=RENDERED, validated="none",
                       reason=f"dry run: manifest rendered only, not validated by a cluster: {why}")
        else:
            doc.update(status=RENDERED, validated="api-server", warnings=list(isvcs.warnings),
                       reason=f"dry run: {write} of {doc['service']} accepted by the API server (dryRun=All: schema "
                              "with strict field validation, KServe's admission webhook); nothing applied")
        log(doc["reason"])
        write_json(out / DEPLOY_FILE, doc)
        return doc
    if isvcs is None:
        isvcs = _clients(cfg, log)
    result = Rollout(isvcs, manifest, cfg.rollout, smoke=smoke, log=log).run()
    with tracking_call(config, f"recording the deployment on {cfg.model_name} v{version}"):
        _record(client, cfg, version, result, doc["service"])
    doc.update(status=result.status, reason=result.reason, previous_version=result.previous_version,
               revision=result.revision, url=result.url, events=result.events, warnings=list(isvcs.warnings),
               timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_json(out / DEPLOY_FILE, doc)
    return doc


__all__ = ["DEPLOY_FILE", "DeployConfig", "MANIFEST_FILE", "deploy_step"]
