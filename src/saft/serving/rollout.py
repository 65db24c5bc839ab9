"""Canary rollout of an InferenceService: apply, watch, promote to 100% or roll back.

Against the InferenceService of the same name:

* **none yet**: it is created (a first revision takes all traffic: KServe has nothing to
  split with). If it never becomes ready it is deleted again, since nothing served before.
* **already serving this version at 100%** and ready: nothing is changed.
* **serving another version**: the predictor is replaced by the new one with
  ``canaryTrafficPercent`` (KServe keeps the rest of the traffic on the last rolled-out
  revision). The canary must become ready (the controller has seen this generation, the
  latest created revision is the latest ready one, ``PredictorReady`` is True), answer a
  smoke prediction on its own tagged URL, and stay ready for ``observe_s``. Then
  ``canaryTrafficPercent`` is removed, which is how KServe promotes the latest revision to
  100%. Otherwise the previous predictor is put back with ``canaryTrafficPercent: 0``, so
  all traffic stays on the revision that served before, and the reason is returned.

A ``False`` readiness condition fails the canary once it has held for ``failure_grace_s``
(Knative reports short-lived False states while a revision starts).
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

from saft.serving.kserve import VERSION_LABEL

PROMOTED, ROLLED_BACK, FAILED, UNCHANGED = "promoted", "rolled back", "failed", "unchanged"
ROLLED_BACK_ANNOTATION = "saft.io/rolled-back"


@dataclass
class RolloutConfig:
    canary_percent: int = 10
    ready_timeout_s: float = 900.0
    poll_s: float = 5.0
    observe_s: float = 60.0
    failure_grace_s: float = 60.0
    smoke_test: bool = True

    def __post_init__(self):
        if not 1 <= self.canary_percent <= 99:
            raise ValueError(f"canary_percent must be from 1 to 99, got {self.canary_percent}")


@dataclass
class RolloutResult:
    status: str
    reason: str
    service: str
    version: str
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


def smoke_request(url: str, model_name: str, timeout_s: float = 30.0) -> None:
    """One prediction on ``url`` with a small generated image; raises with the reason when it fails."""
    from saft.serving.protocol import example_image_b64

    body = json.dumps({"instances": [{"b64": example_image_b64()}], "parameters": {"top_k": 1}}).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/models/{model_name}:predict", data=body, method="POST",
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
        raise RuntimeError(f"smoke prediction on {url} answered without one labelled prediction: {str(doc)[:300]}")


class Rollout:
    """One rollout of ``manifest`` through ``isvcs`` (a ``kube.InferenceServices`` or a stand-in)."""

    def __init__(self, isvcs, manifest: dict, cfg: RolloutConfig, *, model_name: str,
                 smoke: Callable[[str, str], None] | None = smoke_request, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = lambda _: None):
        self.isvcs, self.manifest, self.cfg = isvcs, manifest, cfg
        self.name = manifest["metadata"]["name"]
        self.version = manifest["metadata"]["labels"][VERSION_LABEL]
        self.model_name, self.smoke, self.clock, self.sleep = model_name, smoke, clock, sleep
        self.events: list[str] = []
        self._log = log

    def note(self, message: str) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.events.append(f"{stamp} {message}")
        self._log(message)

    def _result(self, status: str, reason: str, **kw) -> RolloutResult:
        self.note(f"{status}: {reason}")
        return RolloutResult(status, reason, f"{self.manifest['metadata']['namespace']}/{self.name}", self.version,
                             events=self.events, **kw)

    # -- watching -----------------------------------------------------------------------

    def _state(self, generation: int) -> tuple[str, str, dict]:
        """("ready" | "failed" | "pending", why, predictor status) of the current object."""
        obj = self.isvcs.get(self.name)
        if obj is None:
            return "failed", "the InferenceService was deleted", {}
        status = obj.get("status") or {}
        if int(status.get("observedGeneration") or 0) < generation:
            return "pending", "the KServe controller has not seen the change yet", {}
        pred = _predictor_status(obj)
        conds = _conditions(obj)
        ready = conds.get("PredictorReady", conds.get("Ready", {}))
        created, latest = pred.get("latestCreatedRevision"), pred.get("latestReadyRevision")
        if created and created == latest and ready.get("status") == "True":
            return "ready", f"revision {latest} is ready", pred
        for kind in ("PredictorReady", "Ready", "LatestDeploymentReady"):
            cond = conds.get(kind) or {}
            if cond.get("status") == "False":
                detail = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
                return "failed", f"{kind} is False ({detail or 'no reason given'})", pred
        return "pending", f"revision {created or '?'} is not ready yet (ready: {latest or 'none'})", pred

    def wait_ready(self, generation: int) -> tuple[bool, str, dict]:
        deadline = self.clock() + self.cfg.ready_timeout_s
        failing_since = None
        while True:
            state, why, pred = self._state(generation)
            if state == "ready":
                return True, why, pred
            if state == "failed":
                failing_since = self.clock() if failing_since is None else failing_since
                if self.clock() - failing_since >= self.cfg.failure_grace_s:
                    return False, why, pred
            else:
                failing_since = None
            if self.clock() >= deadline:
                return False, f"not ready within {self.cfg.ready_timeout_s:g} s ({why})", pred
            self.sleep(self.cfg.poll_s)

    def healthy(self, generation: int, pred: dict) -> tuple[bool, str]:
        """Smoke prediction on the canary's URL, then still ready (and answering) after ``observe_s``."""
        url = _canary_url(pred)
        if self.cfg.smoke_test and self.smoke is not None:
            if url is None:
                self.note("no URL of the new revision in the status (tag routing off?): smoke prediction skipped")
            else:
                try:
                    self.smoke(url, self.model_name)
                except Exception as exc:  # any failure of the canary is a reason to roll back
                    return False, str(exc)
                self.note(f"smoke prediction on {url} answered")
        end = self.clock() + self.cfg.observe_s
        while self.clock() < end:
            self.sleep(min(self.cfg.poll_s, max(0.0, end - self.clock())))
            state, why, _ = self._state(generation)
            if state != "ready":
                return False, f"lost readiness while observed ({why})"
        if self.cfg.observe_s and url and self.cfg.smoke_test and self.smoke is not None:
            try:
                self.smoke(url, self.model_name)
            except Exception as exc:
                return False, f"after {self.cfg.observe_s:g} s: {exc}"
        return True, "ready and answering"

    # -- the rollout ----------------------------------------------------------------------

    def run(self) -> RolloutResult:
        current = self.isvcs.get(self.name)
        if current is None:
            return self._first()
        previous = (current.get("metadata", {}).get("labels") or {}).get(VERSION_LABEL)
        predictor = (current.get("spec") or {}).get("predictor") or {}
        if previous == self.version and predictor.get("canaryTrafficPercent") in (None, 100):
            state, why, _ = self._state(int(current.get("metadata", {}).get("generation") or 0))
            if state == "ready":
                return self._result(UNCHANGED, f"version {self.version} already serves all traffic ({why})",
                                    previous_version=previous)
        return self._canary(current, previous)

    def _first(self) -> RolloutResult:
        created = self.isvcs.create(self.manifest)
        self.note(f"created {self.name} with version {self.version} (first deployment: all traffic)")
        generation = int(created.get("metadata", {}).get("generation") or 1)
        ok, why, pred = self.wait_ready(generation)
        if ok:
            ok, why = self.healthy(generation, pred)
        if not ok:
            self.isvcs.delete(self.name)
            return self._result(FAILED, f"{why}; deleted the new InferenceService (nothing served before it)")
        return self._result(PROMOTED, f"first deployment ready: {why}", revision=pred.get("latestReadyRevision"),
                            url=pred.get("url"))

    def _canary(self, current: dict, previous: str | None) -> RolloutResult:
        old_predictor = copy.deepcopy(current["spec"]["predictor"])
        old_predictor.pop("canaryTrafficPercent", None)
        old_labels = dict(current["metadata"].get("labels") or {})
        new_predictor = {**copy.deepcopy(self.manifest["spec"]["predictor"]),
                         "canaryTrafficPercent": self.cfg.canary_percent}

        def to_canary(obj: dict) -> None:
            obj["metadata"]["labels"] = {**(obj["metadata"].get("labels") or {}), **self.manifest["metadata"]["labels"]}
            annotations = {**(obj["metadata"].get("annotations") or {}), **self.manifest["metadata"]["annotations"]}
            annotations.pop(ROLLED_BACK_ANNOTATION, None)
            obj["metadata"]["annotations"] = annotations
            obj["spec"]["predictor"] = new_predictor

        updated = self.isvcs.update(self.name, to_canary)
        generation = int(updated.get("metadata", {}).get("generation") or 0)
        self.note(f"canary: version {self.version} gets {self.cfg.canary_percent}% of traffic, "
                  f"version {previous} keeps the rest")
        ok, why, pred = self.wait_ready(generation)
        if ok:
            ok, why = self.healthy(generation, pred)
        if not ok:
            return self._rollback(old_predictor, old_labels, previous, why)

        def promote(obj: dict) -> None:
            obj["spec"]["predictor"].pop("canaryTrafficPercent", None)

        promoted = self.isvcs.update(self.name, promote)
        revision = pred.get("latestReadyRevision")
        self._confirm_promotion(int(promoted.get("metadata", {}).get("generation") or 0), revision)
        return self._result(PROMOTED, f"canary {why}; promoted to 100% of traffic", previous_version=previous,
                            revision=revision, url=pred.get("url"))

    def _confirm_promotion(self, generation: int, revision: str | None) -> None:
        deadline = self.clock() + self.cfg.ready_timeout_s
        while self.clock() < deadline:
            obj = self.isvcs.get(self.name) or {}
            status = obj.get("status") or {}
            pred = _predictor_status(obj)
            if int(status.get("observedGeneration") or 0) >= generation and pred.get("latestRolledoutRevision") == revision:
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
            # 0%: every request goes to the last rolled-out revision at once; the spec is the old one again
            obj["spec"]["predictor"] = {**old_predictor, "canaryTrafficPercent": 0}

        self.isvcs.update(self.name, restore)
        return self._result(ROLLED_BACK, f"canary of version {self.version} failed: {why}; all traffic stays on "
                                         f"version {previous}", previous_version=previous)
