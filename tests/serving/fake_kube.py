"""Local endpoints that answer like the Kubernetes API with KServe and Kubeflow Trainer installed.

Both build on :class:`fake_apiserver.FakeAPI` (strict field validation, dry runs, resource
versions, finalizers and terminating objects) and add the controller and webhook of their
kind, as the real ones behave (KServe 0.16-0.20, Trainer v2.0-v2.3):

:class:`FakeKServe` keeps the ``inferenceservice.finalizers`` finalizer on every service, so a
deleted one lingers (``finalize_reads`` requests) and a create meanwhile is a 409. Its
webhook refuses bad names, ``minReplicas`` > ``maxReplicas`` and a changed
``deploymentMode`` annotation (compared with the mode recorded in the status, normalized, as
KServe 0.19+ does). Its controller reconciles a write only ``lag`` reads later (until then the
status is the previous one), records the mode (``Standard`` when none is annotated, the
default since 0.16), and copies the ``observedGeneration`` of the child object (the Knative
Service or the Deployment, whose counter starts at ``child_generation``) as KServe does:

* ``Knative``: every change of the predictor's containers it reconciles is a revision
  ``NAME-predictor-0000N`` (served under ``/apis/serving.knative.dev/v1``) that becomes ready
  ``ready_after`` reads later, or fails (``RevisionFailed``) when its model version is in
  ``broken``; traffic follows ``canaryTrafficPercent`` between the last rolled-out revision
  and the latest ready one, with ``predictor_url`` on tagged entries.
* ``Standard``: a Deployment ``NAME-predictor`` (served under ``/apis/apps/v1``) whose pod
  template follows the predictor; ``canaryTrafficPercent`` is ignored. Right after a change
  KServe's status still reflects the Deployment's previous rollout (ready), while the
  Deployment has not begun the new one; it then rolls out within ``ready_after`` reads, or
  stalls (``ProgressDeadlineExceeded``) for a broken version.

:class:`FakeTrainer` plays Trainer v2.2+ (``api="v2.2"``: ``runtimePatches``,
``activeDeadlineSeconds``) or v2.0/v2.1 (``api="v2.1"``: ``podTemplateOverrides``, no
deadline) with their conditions only (``Suspended``, ``Complete``, ``Failed``), Kueue's
suspension of a job labelled with a queue until it is admitted, the deadline measured from
creation or the last resume, and Foreground deletion keeping a job until its JobSet is gone.
"""

from __future__ import annotations

import copy
import json
import re
from http.server import BaseHTTPRequestHandler

from fake_apiserver import FakeAPI, now_iso, serve_fake, status_doc

__all__ = ["FakeKServe", "FakePredictor", "FakeTrainer", "serve_fake"]

VERSION_LABEL = "saft.io/model-version"
MODE = "serving.kserve.io/deploymentMode"
LEGACY = {"Serverless": "Knative", "RawDeployment": "Standard"}


def _fields(*names: str, **nested) -> dict:
    return {**{n: None for n in names}, **nested}


_PROBE = _fields("exec", "tcpSocket", "grpc", "initialDelaySeconds", "periodSeconds", "timeoutSeconds",
                 "successThreshold", "failureThreshold", "terminationGracePeriodSeconds",
                 httpGet=_fields("path", "port", "scheme", "host", "httpHeaders"))
_CONTAINER = _fields("name", "image", "command", "args", "workingDir", "volumeMounts", "securityContext",
                     "imagePullPolicy", "lifecycle", "startupProbe",
                     ports=[_fields("containerPort", "name", "protocol", "hostPort")],
                     env=[_fields("name", "value", "valueFrom")],
                     envFrom=[_fields("prefix", secretRef=_fields("name", "optional"),
                                      configMapRef=_fields("name", "optional"))],
                     resources=_fields("requests", "limits", "claims"),
                     readinessProbe=_PROBE, livenessProbe=_PROBE)
# ComponentExtensionSpec + the PodSpec fields a custom predictor uses (KServe's CRD has the whole PodSpec)
ISVC_SPEC = _fields("transformer", "explainer", "canary", predictor=_fields(
    "name", "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency", "timeout",
    "canaryTrafficPercent", "labels", "annotations", "deploymentStrategy", "logger", "batcher", "autoScaling",
    "model", "nodeSelector", "serviceAccountName", "volumes", "affinity", "imagePullSecrets", "priorityClassName",
    "initContainers", "securityContext", "runtimeClassName", "schedulerName",
    containers=[_CONTAINER], tolerations=[_fields("key", "operator", "value", "effect", "tolerationSeconds")]))


class FakeKServe(FakeAPI):
    group, version, plural, kind = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
    spec_fields = ISVC_SPEC
    finalizers = ("inferenceservice.finalizers",)

    def __init__(self, predictor_url: str, ready_after: int = 1, lag: int = 0, default_mode: str = "Standard",
                 child_generation: int = 1, finalize_reads: int = 2):
        super().__init__(finalize_reads)
        self.predictor_url, self.ready_after, self.lag = predictor_url, ready_after, lag
        self.default_mode, self.child_generation = default_mode, child_generation
        self.broken: set[str] = set()  # model versions whose pods never become ready
        self.state: dict[tuple[str, str], dict] = {}

    # -- the webhook ----------------------------------------------------------------------------

    def admit(self, operation: str, obj: dict, old: dict | None) -> str | None:
        name = obj["metadata"]["name"]
        if not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name):
            return (f'the InferenceService "{name}" is invalid: a InferenceService name must consist of lower case '
                    "alphanumeric characters or '-', and must start with alphabetical character.")
        predictor = obj["spec"].get("predictor") or {}
        if predictor.get("maxReplicas") and predictor.get("minReplicas", 1) > predictor["maxReplicas"]:
            return "'MinReplicas' cannot be greater than MaxReplicas"
        if operation == "UPDATE" and not obj["metadata"].get("deletionTimestamp"):
            recorded = self.state.get((old["metadata"]["namespace"], name), {}).get("mode")
            annotated = (obj["metadata"].get("annotations") or {}).get(MODE)
            if recorded and annotated is not None and annotated != recorded:
                return f"update rejected: deploymentMode cannot be changed from '{recorded}' to '{annotated}'"
        return None

    # -- the controller -------------------------------------------------------------------------

    def stored(self, key, obj: dict, old: dict | None) -> None:
        st = self.state.setdefault(key, {"observed": None, "mode": None, "revisions": [], "rolled": None,
                                         "previous": None, "child_generation": self.child_generation - 1})
        if old is None or obj["spec"] != old["spec"]:
            st["lag_left"] = self.lag

    def gone(self, key) -> None:
        self.state.pop(key, None)

    def _reconcile(self, key, obj: dict) -> None:
        st = self.state[key]
        if st["mode"] is None:
            annotated = (obj["metadata"].get("annotations") or {}).get(MODE, "")
            st["mode"] = LEGACY.get(annotated, annotated) if annotated else self.default_mode
        before = st["observed"]
        st["observed"] = copy.deepcopy(obj)
        version = obj["metadata"].get("labels", {}).get(VERSION_LABEL)
        containers = obj["spec"]["predictor"].get("containers")
        changed = before is None or before["spec"]["predictor"].get("containers") != containers
        if before is None or before["spec"] != obj["spec"]:
            st["child_generation"] += 1  # KServe updates its Knative Service / Deployment
        if not changed:
            return
        if st["mode"] == "Knative":
            st["revisions"].append({"name": f"{key[1]}-predictor-{len(st['revisions']) + 1:05d}", "version": version,
                                    "reads": 0, "containers": copy.deepcopy(containers)})
        else:
            st["rollout"] = {"version": version, "containers": copy.deepcopy(containers), "reads": 0}

    def observe(self, key, obj: dict) -> dict | None:
        st = self.state[key]
        if st["observed"] is None or st["observed"]["metadata"]["generation"] < obj["metadata"]["generation"]:
            if st["lag_left"] > 0:
                st["lag_left"] -= 1  # the controller has not reconciled the write yet
            else:
                self._reconcile(key, obj)
        if st["observed"] is None:
            return None
        status = self._knative(key, st) if st["mode"] == "Knative" else self._standard(key, st)
        return {"observedGeneration": st["child_generation"], "deploymentMode": st["mode"],
                "url": f"http://{key[1]}.{key[0]}.example.com", **status}

    def _knative(self, key, st: dict) -> dict:
        latest = st["revisions"][-1]
        latest["reads"] += 1
        failed = latest["version"] in self.broken
        ready = not failed and latest["reads"] > self.ready_after
        ready_names = [r["name"] for r in st["revisions"][:-1] if r["version"] not in self.broken]
        latest_ready = latest["name"] if ready else (st["rolled"] if st["rolled"] in ready_names else None)
        canary = st["observed"]["spec"]["predictor"].get("canaryTrafficPercent")
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
        return {"conditions": [{"type": t, **cond} for t in ("PredictorReady", "Ready")],
                "components": {"predictor": {
                    "latestCreatedRevision": latest["name"], "latestReadyRevision": latest_ready,
                    "latestRolledoutRevision": st["rolled"], "previousRolledoutRevision": st["previous"],
                    "traffic": traffic, "url": f"http://{key[1]}-predictor.{key[0]}.example.com"}}}

    def _deployment(self, key, count: bool) -> dict | None:
        """The predictor Deployment of a Standard-mode service, as the Deployment controller has it now."""
        st = self.state.get(key)
        if not st or st["mode"] != "Standard" or "rollout" not in st:
            return None
        rollout = st["rollout"]
        rollout["reads"] += count
        first = st.get("done") is None
        seen = rollout["reads"] > 1  # the Deployment controller starts the rollout a read after KServe's update
        broken = rollout["version"] in self.broken
        done = seen and not broken and rollout["reads"] > self.ready_after + 1
        if done:
            st["done"] = rollout["version"]
        generation = st["child_generation"]
        template = rollout["containers"]
        if not seen:  # status still that of the previous rollout
            conditions = [] if first else [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]
            replicas = {} if first else {"replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}
            observed = generation - 1
        elif done:
            conditions = [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                          {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]
            replicas, observed = {"replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}, generation
        else:
            stalled = broken and rollout["reads"] > self.ready_after + 1
            progressing = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                           "message": f'ReplicaSet "{key[1]}-predictor-{generation}" has timed out progressing.'} \
                if stalled else {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}
            available = {"type": "Available", "status": "True" if not first else "False",
                         "reason": "MinimumReplicasAvailable" if not first else "MinimumReplicasUnavailable"}
            conditions = [available, progressing]
            replicas = {"replicas": 1 if first else 2, "updatedReplicas": 1, "availableReplicas": 0 if first else 1}
            observed = generation
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": f"{key[1]}-predictor", "namespace": key[0], "generation": generation},
                "spec": {"replicas": 1, "template": {"spec": {"containers": template}}},
                "status": {"observedGeneration": observed, "conditions": conditions, **replicas}}

    def _standard(self, key, st: dict) -> dict:
        deployment = self._deployment(key, count=True)
        conds = {c["type"]: c for c in deployment["status"]["conditions"]}
        available, progressing = conds.get("Available", {}), conds.get("Progressing", {})
        if progressing.get("status") == "False" or available.get("status") == "False":
            cause = progressing if progressing.get("status") == "False" else available
            cond = {"status": "False", "reason": cause["reason"], "message": cause.get("message", "")}
        elif available.get("status") == "True":
            cond = {"status": "True", "reason": progressing.get("reason", "")}
        else:
            cond = {"status": "False", "reason": ""}
        predictor = {"url": self.predictor_url} if cond["status"] == "True" else {}  # the cluster-local URL
        return {"conditions": [{"type": t, **cond} for t in ("PredictorReady", "Ready")],
                "components": {"predictor": predictor}}

    def extra(self, method: str, path: str):
        match = re.match(r"^/apis/serving\.knative\.dev/v1/namespaces/(?P<ns>[^/]+)/revisions/(?P<name>[^/]+)$", path)
        if match:
            for (ns, _), st in self.state.items():
                for revision in st["revisions"] if ns == match["ns"] else []:
                    if revision["name"] == match["name"]:
                        return 200, {"apiVersion": "serving.knative.dev/v1", "kind": "Revision",
                                     "metadata": {"name": revision["name"], "namespace": ns},
                                     "spec": {"containers": revision["containers"]}}
            return 404, status_doc(404, "NotFound", f'revisions.serving.knative.dev "{match["name"]}" not found')
        match = re.match(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments/(?P<name>[^/]+)$", path)
        if not match:
            return None
        key = (match["ns"], match["name"].removesuffix("-predictor"))
        deployment = self._deployment(key, count=False) if key in self.objects else None
        if deployment is None:
            return 404, status_doc(404, "NotFound", f'deployments.apps "{match["name"]}" not found')
        return 200, deployment


class FakePredictor(BaseHTTPRequestHandler):
    """Answers smoke predictions like ``saft serve``; ``healthy = False`` makes it fail with a 500."""

    healthy = True
    model_version: str | None = None
    calls: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        type(self).calls.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ok = type(self).healthy
        doc = {"predictions": [{"labels": ["circle"], "probabilities": [0.9]}]} if ok else {"error": "internal error"}
        if ok and type(self).model_version is not None:
            doc["model_version"] = type(self).model_version
        data = json.dumps(doc).encode()
        self.send_response(200 if ok else 500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


_TRAINER = _fields("image", "command", "args", "env", "numNodes", "numProcPerNode", "resourcesPerNode")
_TRAINJOB_COMMON = _fields("runtimeRef", "initializer", "suspend", "managedBy", "labels", "annotations",
                           trainer=_TRAINER)
TRAINJOB_SPEC = {  # Trainer's structural schema by release
    "v2.1": {**_TRAINJOB_COMMON, "podTemplateOverrides": None},
    "v2.2": {**_TRAINJOB_COMMON, "runtimePatches": None, "activeDeadlineSeconds": None},
}
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


class FakeTrainer(FakeAPI):
    """Kubeflow Trainer's TrainJobs, with a controller that runs each job (and Kueue, when a job names a queue).

    A job labelled ``kueue.x-k8s.io/queue-name`` is suspended on creation (Kueue's webhook) and
    admitted ``queue_reads`` reads later (``None``: never). Then it runs for ``run_reads`` reads
    (``None``: forever) and gets ``Complete`` (calling ``on_complete(manifest)`` first, as the job
    would have written its outputs) or, with ``fail_message``, ``Failed`` (``FailedJobs``). With
    ``activeDeadlineSeconds`` and ``clock`` (seconds), a job running past its deadline (from
    creation or the last resume) gets ``Failed``, reason ``DeadlineExceeded``. ``forbidden``
    namespaces answer 403 to a create.
    """

    group, version, plural, kind = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"

    def __init__(self, run_reads: int | None = 2, fail_message: str = "", on_complete=None, api: str = "v2.2",
                 queue_reads: int | None = 0, clock=None, finalize_reads: int = 2):
        super().__init__(finalize_reads)
        self.spec_fields = TRAINJOB_SPEC[api]
        self.run_reads, self.fail_message, self.on_complete = run_reads, fail_message, on_complete
        self.queue_reads, self.clock = queue_reads, clock
        self.forbidden: set[str] = set()
        self.jobs: dict[tuple[str, str], dict] = {}

    def invalid(self, obj: dict, old: dict | None) -> list[str]:
        errors = []
        deadline = obj["spec"].get("activeDeadlineSeconds")
        if deadline is not None and deadline < 1:
            errors.append(f"spec.activeDeadlineSeconds: Invalid value: {deadline}: spec.activeDeadlineSeconds in body "
                          "should be greater than or equal to 1")
        if old is not None:
            for immutable in ("runtimeRef", "trainer", "activeDeadlineSeconds"):
                if obj["spec"].get(immutable) != old["spec"].get(immutable):
                    errors.append(f"spec.{immutable}: Invalid value: \"object\": field is immutable")
        return errors

    def admit(self, operation: str, obj: dict, old: dict | None) -> str | None:
        if operation == "CREATE" and (obj["metadata"].get("labels") or {}).get(QUEUE_LABEL):
            obj["spec"]["suspend"] = True  # Kueue's webhook: the job waits for admission
        return None

    def stored(self, key, obj: dict, old: dict | None) -> None:
        if old is None:
            self.jobs[key] = {"reads": 0, "queued": 0, "started": self._now(), "conditions": {}}

    def gone(self, key) -> None:
        self.jobs.pop(key, None)

    def _now(self) -> float:
        return self.clock() if self.clock else 0.0

    def _set(self, job: dict, kind: str, status: str, reason: str, message: str) -> None:
        job["conditions"][kind] = {"type": kind, "status": status, "reason": reason, "message": message,
                                   "lastTransitionTime": now_iso()}

    def observe(self, key, obj: dict) -> dict | None:
        job = self.jobs[key]
        conds = job["conditions"]
        if obj["metadata"].get("deletionTimestamp") or any(
                c["status"] == "True" for k, c in conds.items() if k in ("Complete", "Failed")):
            return {"conditions": list(conds.values())} if conds else None
        if obj["spec"].get("suspend"):
            job["queued"] += 1
            if self.queue_reads is not None and job["queued"] > self.queue_reads:
                obj["spec"]["suspend"] = False  # Kueue admits the job
                self._set(job, "Suspended", "False", "Resumed", "TrainJob is resumed")
                job["started"] = self._now()
            else:
                if "Suspended" not in conds:
                    self._set(job, "Suspended", "True", "Suspended", "TrainJob is suspended")
                return {"conditions": list(conds.values())}
        job["reads"] += 1
        deadline = obj["spec"].get("activeDeadlineSeconds")
        if deadline and self.clock and self._now() - job["started"] > deadline:
            self._set(job, "Failed", "True", "DeadlineExceeded", "TrainJob exceeded its active deadline")
        elif self.run_reads is not None and job["reads"] > self.run_reads:
            if self.fail_message:
                self._set(job, "Failed", "True", "FailedJobs", self.fail_message)
            else:
                if self.on_complete is not None:
                    self.on_complete(obj)
                self._set(job, "Complete", "True", "AllJobsCompleted", "jobset completed successfully")
        return {"conditions": list(conds.values()), "jobsStatus": [{"name": "node", "active": 1}]} if conds else \
            {"jobsStatus": [{"name": "node", "active": 1}]}

    def handle(self, method: str, path: str, body: dict | None, query: dict[str, str]):
        match = re.match(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/(?P<ns>[^/]+)/trainjobs$", path)
        if method == "POST" and match and match["ns"] in self.forbidden:
            ns = match["ns"]
            return 403, status_doc(403, "Forbidden", f'trainjobs.trainer.kubeflow.org is forbidden: User '
                                                     f'"system:serviceaccount:{ns}:pipeline-runner" cannot create '
                                                     f'resource "trainjobs" in API group "trainer.kubeflow.org" in '
                                                     f'the namespace "{ns}"'), []
        return super().handle(method, path, body, query)
