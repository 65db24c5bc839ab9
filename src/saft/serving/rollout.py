"""Rollout of an InferenceService: apply, watch, promote to 100% or roll back.

Against the InferenceService of the same name:

* **none yet** (or one still being deleted: its finalizer runs first, so the rollout waits
  for it to go): it is created; the first revision takes all traffic. If it never becomes
  ready it is deleted again, since nothing served before.
* **already serving this version at 100%**: nothing is changed once KServe reports it ready.
* **serving another version**, ``canary_percent`` > 0 (``Knative`` mode only): the
  predictor is replaced by the new one with ``canaryTrafficPercent`` (KServe keeps the rest
  of the traffic on the last rolled-out revision). The canary must become ready (the
  controller has created the new revision, the latest created revision is the latest ready
  one, ``PredictorReady`` is True), answer a smoke prediction on its own tagged URL, and stay
  ready for ``observe_s``. Then ``canaryTrafficPercent`` is removed, which is how KServe
  promotes the latest revision to 100%. Otherwise the previous predictor is put back with
  ``canaryTrafficPercent: 0``, so all traffic stays on the revision that served before.
* **serving another version**, ``canary_percent`` 0: the predictor is replaced in place
  (Knative moves traffic once the new revision is ready; ``Standard`` mode rolls its
  Deployment). A failure puts the previous predictor back.

When has KServe seen a change? Not when ``status.observedGeneration`` reaches the
InferenceService's ``metadata.generation``: KServe copies the ``observedGeneration`` of the
Knative Service (Knative mode) or of the predictor's Deployment (Standard mode) into the
InferenceService's status (``PropagateStatus`` / ``PropagateRawStatus``), a counter of
another object that drifts from the InferenceService's own. Nor when a new revision
appears: writes the controller has not reconciled yet are coalesced, so a rollout right
after a rollback may find its version's revision already there. So the rollout reads what
actually runs: in Knative mode the Knative Revision named ``latestCreatedRevision``
(``serving.knative.dev/v1``), in Standard mode the predictor Deployment; either must run
the new model URI, and in Standard mode be rolled out to every replica (KServe can report
the service ready from the Deployment's previous rollout before the Deployment controller
has begun the new one).

A ``False`` readiness condition fails the rollout once it has held for ``failure_grace_s``
(Knative reports short-lived False states while a revision starts). In Standard mode an
unavailable Deployment (``MinimumReplicasUnavailable``) is a pod still starting, not a
failure; a stalled rollout (``ProgressDeadlineExceeded``) is one.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from saft.config import check, setting
from saft.serving.kserve import CONTAINER, KNATIVE, MODE_ANNOTATION, STANDARD, VERSION_LABEL, mode_of
from saft.serving.kube import terminating
from saft.io import shorten

PROMOTED, ROLLED_BACK, FAILED, UNCHANGED = "promoted", "rolled back", "failed", "unchanged"
ROLLED_BACK_ANNOTATION = "saft.io/rolled-back"


@dataclass
class RolloutConfig:
    """How a new version goes live."""

    canary_percent: int = setting(10, minimum=0, maximum=99,
                                  help="traffic to the new version first, 1-99 (Knative mode); 0 replaces the "
                                       "predictor in place without a canary")
    ready_timeout_s: float = setting(900.0, minimum=0.0, flag="--ready-timeout",
                                     help="seconds the new version may take to become ready")
    poll_s: float = setting(5.0, minimum=0.0, flag="--poll", help="seconds between status reads")
    observe_s: float = setting(60.0, minimum=0.0, flag="--observe",
                               help="seconds a ready canary is watched before it gets all traffic")
    failure_grace_s: float = setting(60.0, minimum=0.0, flag="--failure-grace",
                                     help="seconds a False readiness condition may last before the canary counts as "
                                          "failed")
    smoke_test: bool = setting(True, help="send one request to the new version before promoting it")

    def __post_init__(self):
        check(self)


def check_mode(mode: str, canary_percent: int) -> None:
    """Refuse a canary in a mode that has none, saying what to do instead."""
    if mode == STANDARD and canary_percent:
        raise ValueError(
            f"a canary ({canary_percent}% of traffic) needs KServe's Knative deployment mode: canaryTrafficPercent "
            "splits traffic between Knative revisions, and the Standard mode (a Deployment; KServe's default since "
            "0.16) has no revisions to split. KServe 0.20's spec.canary for Standard mode needs a predictor with a "
            "storage URI or model format, which the saft custom predictor is not. Use --deployment-mode Knative "
            "(Knative Serving installed), or --canary-percent 0 to replace the predictor in place (a rolling "
            "update, rolled back if it does not become ready)")


@dataclass
class RolloutResult:
    status: str
    reason: str
    service: str
    version: str
    mode: str = ""
    previous_version: str | None = None
    revision: str | None = None
    url: str | None = None
    events: list[str] = field(default_factory=list)


def _conditions(obj: dict) -> dict[str, dict]:
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}


def _predictor_status(obj: dict) -> dict:
    return ((obj.get("status") or {}).get("components") or {}).get("predictor") or {}


def _canary_url(status: dict) -> str | None:
    for target in status.get("traffic") or []:
        if target.get("url") and (target.get("latestRevision") or target.get("tag") == "latest"
                                  or target.get("revisionName") == status.get("latestReadyRevision")):
            return target["url"]
    return None


def _failed_condition(conds: dict[str, dict]) -> str | None:
    for kind in ("PredictorReady", "Ready", "LatestDeploymentReady"):
        cond = conds.get(kind) or {}
        if cond.get("status") == "False":
            detail = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
            return f"{kind} is False ({detail or 'no reason given'})"
    return None


def _runs(pod_spec: dict, model_uri: str) -> bool:
    """Whether ``pod_spec`` (a Knative Revision's spec, a Deployment's pod template spec) serves ``model_uri``."""
    containers = pod_spec.get("containers") or []
    return any(c.get("name") == CONTAINER and model_uri in (c.get("args") or []) for c in containers)


def _rolled_out(deployment: dict, model_uri: str) -> tuple[str, str]:
    """("ready" | "failed" | "pending", why) of a Standard-mode predictor Deployment for ``model_uri``."""
    name = deployment["metadata"]["name"]
    if not _runs(deployment.get("spec", {}).get("template", {}).get("spec") or {}, model_uri):
        return "pending", f"Deployment {name} does not run {model_uri} yet"
    status = deployment.get("status") or {}
    for cond in status.get("conditions") or []:
        if (cond.get("type"), cond.get("status")) in (("Progressing", "False"), ("ReplicaFailure", "True")):
            return "failed", f"Deployment {name}: {cond.get('reason')}: {cond.get('message')}"
    if int(status.get("observedGeneration") or 0) < int(deployment["metadata"].get("generation") or 0):
        return "pending", f"the Deployment controller has not seen {name}'s new pod template yet"
    wanted = int(deployment.get("spec", {}).get("replicas") or 1)
    updated, total = int(status.get("updatedReplicas") or 0), int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    if updated < wanted or total > updated or available < updated:
        return "pending", (f"Deployment {name}: {updated} of {wanted} replicas updated, {available} available, "
                           f"{max(0, total - updated)} old still running")
    return "ready", f"Deployment {name} rolled out ({updated} replicas)"


def smoke_request(url: str, served_name: str, version: str, timeout_s: float = 30.0) -> None:
    """One prediction on ``url`` with a small generated image; raises with the reason when it fails."""
    from saft.serving.protocol import example_image_b64

    body = json.dumps({"instances": [{"b64": example_image_b64()}], "parameters": {"top_k": 1}}).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/models/{served_name}:predict", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout_s) as response:
            doc = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"smoke prediction on {url} answered HTTP {exc.code}: "
                           f"{exc.read()[:300].decode(errors='replace')}") from None
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"smoke prediction on {url} failed ({type(exc).__name__}: {exc})") from None
    predictions = doc.get("predictions") if isinstance(doc, dict) else None
    if not isinstance(predictions, list) or len(predictions) != 1 or not predictions[0].get("labels"):
        raise RuntimeError(f"smoke prediction on {url} answered without one labelled prediction: {shorten(str(doc))}")
    answered = doc.get("model_version")
    if answered is not None and str(answered) != str(version):
        raise RuntimeError(f"smoke prediction on {url} was answered by version {answered}, not {version}")


class Rollout:
    """One rollout of ``manifest`` through ``isvcs`` (a ``kube.InferenceServices`` or a stand-in)."""

    def __init__(self, isvcs, manifest: dict, cfg: RolloutConfig, *,
                 smoke: Callable[[str, str, str], None] | None = smoke_request,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 log: Callable[[str], None] = lambda _: None):
        self.isvcs, self.manifest, self.cfg = isvcs, manifest, cfg
        meta = manifest["metadata"]
        self.name, self.version = meta["name"], meta["labels"][VERSION_LABEL]
        self.mode = meta["annotations"][MODE_ANNOTATION]
        self.model_uri = manifest["spec"]["predictor"]["containers"][0]["args"][0]
        check_mode(self.mode, cfg.canary_percent)
        self.smoke, self.clock, self.sleep = smoke, clock, sleep
        self.events: list[str] = []
        self._log = log

    def note(self, message: str) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.events.append(f"{stamp} {message}")
        self._log(message)

    def _result(self, status: str, reason: str, **kw) -> RolloutResult:
        self.note(f"{status}: {reason}")
        return RolloutResult(status, reason, f"{self.manifest['metadata']['namespace']}/{self.name}", self.version,
                             mode=self.mode, events=self.events, **kw)

    # -- watching -----------------------------------------------------------------------

    def _state(self) -> tuple[str, str, dict]:
        """("ready" | "failed" | "pending", why, predictor status) of the live service, for this version."""
        obj = self.isvcs.get(self.name)
        if obj is None or terminating(obj):
            return "failed", "the InferenceService was deleted", {}
        status = obj.get("status") or {}
        pred = _predictor_status(obj)
        conds = _conditions(obj)
        ready = conds.get("PredictorReady", conds.get("Ready", {})).get("status") == "True"
        if self.mode == STANDARD:
            deployment = self.isvcs.deployment(f"{self.name}-predictor")
            if deployment is None:
                return "pending", f"KServe has not created the Deployment {self.name}-predictor yet", pred
            state, why = _rolled_out(deployment, self.model_uri)
            if state == "ready" and not ready:
                return "pending", f"{why}, but PredictorReady is not True yet", pred
            return state, why, {**pred, "url": pred.get("url") or status.get("url")}
        created, latest = pred.get("latestCreatedRevision"), pred.get("latestReadyRevision")
        revision = self.isvcs.revision(created) if created else None
        if revision is None or not _runs(revision.get("spec") or {}, self.model_uri):
            return "pending", (f"the KServe controller has not created the revision of {self.model_uri} yet "
                               f"(latest: {created or 'none'})"), pred
        failed = _failed_condition(conds)
        if failed:
            return "failed", failed, pred
        if created == latest and ready:
            return "ready", f"revision {latest} is ready", pred
        return "pending", f"revision {created} is not ready yet (ready: {latest or 'none'})", pred

    def wait_ready(self) -> tuple[bool, str, dict]:
        deadline = self.clock() + self.cfg.ready_timeout_s
        failing_since, last_why = None, None
        while True:
            state, why, pred = self._state()
            if state == "ready":
                return True, why, pred
            if why != last_why:  # progress: each new reason to wait, once
                self.note(f"waiting: {why}")
                last_why = why
            if state == "failed":
                failing_since = self.clock() if failing_since is None else failing_since
                if self.clock() - failing_since >= self.cfg.failure_grace_s:
                    return False, why, pred
            else:
                failing_since = None
            if self.clock() >= deadline:
                return False, f"not ready within {self.cfg.ready_timeout_s:g} s ({why})", pred
            self.sleep(self.cfg.poll_s)

    def _smoke_url(self, pred: dict) -> str | None:
        return _canary_url(pred) if self.mode == KNATIVE else pred.get("url")

    def healthy(self, pred: dict) -> tuple[bool, str]:
        """Smoke prediction on the new version's URL, then still ready (and answering) after ``observe_s``."""
        url = self._smoke_url(pred)
        smoke = self.smoke if self.cfg.smoke_test else None
        if smoke is not None:
            if url is None:
                self.note("no URL of the new revision in the status (tag routing off?): smoke prediction skipped")
            else:
                try:
                    smoke(url, self.name, self.version)
                except Exception as exc:  # any failure of the new version is a reason to roll back
                    return False, str(exc)
                self.note(f"smoke prediction on {url} answered")
        end = self.clock() + self.cfg.observe_s
        while self.clock() < end:
            self.sleep(min(self.cfg.poll_s, max(0.0, end - self.clock())))
            state, why, _ = self._state()
            if state != "ready":
                return False, f"lost readiness while observed ({why})"
        if self.cfg.observe_s and url and smoke is not None:
            try:
                smoke(url, self.name, self.version)
            except Exception as exc:
                return False, f"after {self.cfg.observe_s:g} s: {exc}"
        return True, "ready and answering"

    # -- the rollout ----------------------------------------------------------------------

    def run(self) -> RolloutResult:
        current = self.isvcs.get(self.name)
        if terminating(current):
            self.note(f"{self.name} is being deleted (finalizers): waiting for it to go before creating it again")
            if not self.isvcs.wait_gone(self.name, self.cfg.ready_timeout_s, poll_s=self.cfg.poll_s,
                                        clock=self.clock, sleep=self.sleep):
                return self._result(FAILED, f"{self.name} was still being deleted after {self.cfg.ready_timeout_s:g} s;"
                                            " nothing was changed")
            current = None
        if current is None:
            return self._first()
        self._check_mode_of(current)
        previous = (current.get("metadata", {}).get("labels") or {}).get(VERSION_LABEL)
        if self._serves_all_traffic(current):
            ok, why, _ = self.wait_ready()
            if ok:
                return self._result(UNCHANGED, f"version {self.version} already serves all traffic ({why})",
                                    previous_version=previous)
            return self._result(FAILED, f"version {self.version} is deployed with all traffic but not ready: {why}; "
                                        "nothing was changed", previous_version=previous)
        return self._replace(current, previous)

    def _check_mode_of(self, current: dict) -> None:
        existing = mode_of(current)
        if existing and existing != self.mode:
            namespace = self.manifest["metadata"]["namespace"]
            raise ValueError(f"InferenceService {namespace}/{self.name} runs in KServe's {existing} mode and KServe "
                             f"does not change a service's mode after it was created; deploy with --deployment-mode "
                             f"{existing}, or delete it (kubectl delete inferenceservice -n {namespace} {self.name}) "
                             f"to create it in {self.mode} mode")

    def _serves_all_traffic(self, current: dict) -> bool:
        predictor = (current.get("spec") or {}).get("predictor") or {}
        return ((current.get("metadata", {}).get("labels") or {}).get(VERSION_LABEL) == self.version
                and predictor.get("canaryTrafficPercent") in (None, 100))

    def _to_new(self, obj: dict) -> None:
        """``obj`` (the live service) changed to serve the new version, with the canary share when there is one."""
        predictor = copy.deepcopy(self.manifest["spec"]["predictor"])
        if self.cfg.canary_percent:
            predictor["canaryTrafficPercent"] = self.cfg.canary_percent
        obj["metadata"]["labels"] = {**(obj["metadata"].get("labels") or {}), **self.manifest["metadata"]["labels"]}
        annotations = {**(obj["metadata"].get("annotations") or {}), **self.manifest["metadata"]["annotations"]}
        # The mode is fixed at creation, and KServe's webhook compares the annotation of an update with the mode
        # recorded in the status (normalized since 0.19): send that value, so a service created with a legacy
        # name (Serverless) is updated as Knative.
        recorded = (obj.get("status") or {}).get("deploymentMode")
        annotations[MODE_ANNOTATION] = recorded or (obj["metadata"].get("annotations") or {}).get(MODE_ANNOTATION,
                                                                                                  self.mode)
        annotations.pop(ROLLED_BACK_ANNOTATION, None)
        obj["metadata"]["annotations"] = annotations
        obj["spec"]["predictor"] = predictor

    def validate(self) -> str:
        """Send this rollout's first write as a server-side dry run (``dryRun=All``); say which write it was.

        The API server checks it as it would the real one: the schema with strict field
        validation, defaulting and KServe's admission webhook; nothing is stored.
        """
        current = self.isvcs.get(self.name)
        if current is None or terminating(current):
            self.isvcs.create(self.manifest, dry_run=True)
            return "the creation"
        self._check_mode_of(current)
        if self._serves_all_traffic(current):
            return f"nothing to write (version {self.version} already serves all traffic): the check"
        self.isvcs.update(self.name, self._to_new, dry_run=True)
        return "the canary update" if self.cfg.canary_percent else "the in-place update"

    def _first(self) -> RolloutResult:
        self.isvcs.create_when_free(self.manifest, self.cfg.ready_timeout_s, poll_s=self.cfg.poll_s,
                                    clock=self.clock, sleep=self.sleep, log=self.note)
        self.note(f"created {self.name} ({self.mode} mode) with version {self.version} (first deployment: all traffic)")
        ok, why, pred = self.wait_ready()
        if ok:
            ok, why = self.healthy(pred)
        if not ok:
            self.isvcs.delete(self.name)
            return self._result(FAILED, f"{why}; deleted the new InferenceService (nothing served before it)")
        return self._result(PROMOTED, f"first deployment ready: {why}", revision=pred.get("latestReadyRevision"),
                            url=pred.get("url"))

    def _replace(self, current: dict, previous: str | None) -> RolloutResult:
        old_predictor = copy.deepcopy(current["spec"]["predictor"])
        old_predictor.pop("canaryTrafficPercent", None)
        old_labels = dict(current["metadata"].get("labels") or {})
        canary = self.cfg.canary_percent
        self.isvcs.update(self.name, self._to_new)
        if canary:
            self.note(f"canary: version {self.version} gets {canary}% of traffic, version {previous} keeps the rest")
        else:
            self.note(f"replacing version {previous} by {self.version} in place ({self.mode} mode, no canary)")
        ok, why, pred = self.wait_ready()
        if ok:
            ok, why = self.healthy(pred)
        if not ok:
            return self._rollback(old_predictor, old_labels, previous, why)
        revision = pred.get("latestReadyRevision")
        if canary:
            def promote(obj: dict) -> None:
                obj["spec"]["predictor"].pop("canaryTrafficPercent", None)

            self.isvcs.update(self.name, promote)
        if self.mode == KNATIVE:
            self._confirm_promotion(revision)
        what = f"canary {why}; promoted to 100% of traffic" if canary else f"{why}; serves all traffic"
        return self._result(PROMOTED, what, previous_version=previous, revision=revision, url=pred.get("url"))

    def _confirm_promotion(self, revision: str | None) -> None:
        deadline = self.clock() + self.cfg.ready_timeout_s
        while self.clock() < deadline:
            if _predictor_status(self.isvcs.get(self.name) or {}).get("latestRolledoutRevision") == revision:
                self.note(f"revision {revision} rolled out to 100%")
                return
            self.sleep(self.cfg.poll_s)
        self.note(f"promotion requested, but the status did not show {revision} at 100% within "
                  f"{self.cfg.ready_timeout_s:g} s")

    def _rollback(self, old_predictor: dict, old_labels: dict, previous: str | None, why: str) -> RolloutResult:
        def restore(obj: dict) -> None:
            obj["metadata"]["labels"] = old_labels
            annotations = dict(obj["metadata"].get("annotations") or {})
            annotations[ROLLED_BACK_ANNOTATION] = f"version {self.version}: {why}"[:1000]
            obj["metadata"]["annotations"] = annotations
            # Knative: 0% pins every request to the last rolled-out revision at once; the spec is the old one again.
            # Standard: the old pod template rolls back in (its pods never stopped serving while the new ones failed).
            obj["spec"]["predictor"] = {**old_predictor, "canaryTrafficPercent": 0} if self.mode == KNATIVE \
                else old_predictor

        self.isvcs.update(self.name, restore)
        what = "canary" if self.cfg.canary_percent else "replacement"
        return self._result(ROLLED_BACK, f"{what} of version {self.version} failed: {why}; all traffic stays on "
                                         f"version {previous}", previous_version=previous)
