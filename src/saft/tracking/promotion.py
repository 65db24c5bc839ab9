"""The promotion gate: when the ``champion`` alias may move to a new model version.

Rule (tolerances are absolute top-1 fractions; 0.01 = one point), on one of two metrics:

* ``id_ood`` (suites with ID and OOD roles: domain shift, cross-dataset): against
  zero-shot, always (the base model is the champion every fine-tuned model must beat,
  and it was scored in the same metrics document as the candidate):
  ``ood_mean >= zs.ood_mean - ood_tolerance`` and ``id >= zs.id - id_tolerance``; against
  the current ``champion``, when there is one, the same with the champion's numbers.
  On a cross-dataset suite the OOD mean is over the datasets not trained on.
* ``hm`` (base-to-new suites): ``hm >= reference.hm - hm_tolerance`` against zero-shot
  and against the champion, where ``hm`` is the harmonic mean of the mean base and the
  mean new accuracy (CoCoOp). It weighs the classes trained on and the classes never
  seen alike: a candidate that gains on base by forgetting new classes is refused.

``gate_metric`` picks the metric a suite supports (``auto``: ``hm`` for base-to-new,
``id_ood`` otherwise) before any training runs, so a suite the gate cannot judge fails
at once, not after the GPU work.

A drop of exactly the tolerance passes. A champion evaluated on another suite or trained
on another base (fingerprint) is not comparable: the candidate is rejected with that
reason instead of being compared on numbers that measure different things. Register a
new base under a new model name, or move the alias by hand after evaluating both on the
same suite.

Every decision is written to the version's tags (``saft.promotion.*``) before any alias
moves, so a re-run is a no-op: a version that is already champion gets the verdict
``already champion``; a version decided earlier keeps its verdict and the aliases stay
as they are, except when an earlier run recorded ``promoted`` and stopped before the
alias moved (the champion is still the one it was compared against): then the move is
completed. On promotion ``previous-champion`` is set to the old champion first, then
``champion`` to the candidate.

Overlapping gates (a scheduled and a CI-triggered retraining) are serialized by a lease
held in the registry itself (``saft.tracking.lease``): each gate reads the champion,
decides, records and moves the aliases while it holds the lease on the registered model,
so the result is that of some serial order and the better candidate ends as champion.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
PROMOTED, REJECTED, ALREADY_CHAMPION = "promoted", "rejected", "already champion"
AUDIT_SCHEMA = "saft-promotion/1"

# version tags written at registration (registry.py) and read here
ID_TAG, OOD_TAG, HM_TAG = "saft.id", "saft.ood_mean", "saft.hm"
ZS_ID_TAG, ZS_OOD_TAG, ZS_HM_TAG = "saft.zeroshot.id", "saft.zeroshot.ood_mean", "saft.zeroshot.hm"
GATE_METRICS = ("id_ood", "hm")
SUITE_TAG, FINGERPRINT_TAG = "saft.suite", "saft.base_fingerprint"
# decision tags
VERDICT_TAG = "saft.promotion.verdict"
REASON_TAG = "saft.promotion.reason"
RULE_TAG = "saft.promotion.rule"
OOD_TOL_TAG = "saft.promotion.ood_tolerance"
ID_TOL_TAG = "saft.promotion.id_tolerance"
COMPARED_TAG = "saft.promotion.compared_to"  # champion version at decision time, or "none"
TIME_TAG = "saft.promotion.timestamp"
RUN_TAG = "saft.promotion.run_id"
REPLACED_TAG = "saft.promotion.replaced_by"  # on a champion that lost the alias
NO_CHAMPION = "none"
_EPS = 1e-9  # float slack so "a drop of exactly the tolerance" passes
_REASON_LIMIT = 4000


@dataclass(frozen=True)
class Scores:
    id: float | None = None
    ood_mean: float | None = None
    hm: float | None = None


@dataclass(frozen=True)
class GateRule:
    ood_tolerance: float = 0.01
    id_tolerance: float = 0.01
    metric: str = "id_ood"  # id_ood | hm
    hm_tolerance: float = 0.01

    def __post_init__(self) -> None:
        if self.metric not in GATE_METRICS:
            raise ValueError(f"gate metric must be one of {', '.join(GATE_METRICS)}, got {self.metric!r}")
        for name in ("ood_tolerance", "id_tolerance", "hm_tolerance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a fraction in [0, 1) (0.01 = one point of top-1), got {value!r}")

    @property
    def text(self) -> str:
        if self.metric == "hm":
            return (f"promote iff, against zero-shot and against the current champion: "
                    f"hm (harmonic mean of mean base and mean new top-1) >= reference - {self.hm_tolerance:g}")
        return (f"promote iff, against zero-shot and against the current champion: "
                f"ood_mean >= reference - {self.ood_tolerance:g} and id >= reference - {self.id_tolerance:g}")

    @property
    def fields(self) -> tuple[str, ...]:
        """The Scores fields this rule compares."""
        return ("hm",) if self.metric == "hm" else ("ood_mean", "id")


def gate_metric(roles: set[str], requested: str = "auto", where: str = "the suite") -> str:
    """The gate metric for a suite with these roles; ValueError when the suite cannot be judged."""
    b2n, id_ood = {"base", "new"} <= roles, {"id", "ood"} <= roles
    if requested == "auto":
        if b2n or id_ood:
            return "hm" if b2n else "id_ood"
        raise ValueError(f"{where} has roles {', '.join(sorted(roles)) or 'none'}: the promotion gate needs ID and "
                         "OOD entries (metric id_ood) or base and new entries (metric hm); use another suite or "
                         "set register.enabled: false")
    if requested not in GATE_METRICS:
        raise ValueError(f"gate metric must be auto or one of {', '.join(GATE_METRICS)}, got {requested!r}")
    if (requested == "hm" and not b2n) or (requested == "id_ood" and not id_ood):
        need = "base and new" if requested == "hm" else "ID and OOD"
        raise ValueError(f"{where} has no {need} entries, which the gate metric {requested!r} compares; set "
                         "register.gate: auto")
    return requested


@dataclass(frozen=True)
class Check:
    name: str
    candidate: float
    reference: float
    tolerance: float
    passed: bool

    def describe(self) -> str:
        drop = self.reference - self.candidate
        word = "within" if self.passed else "exceeds"
        return (f"{self.name}: {100 * self.candidate:.2f} vs {100 * self.reference:.2f} "
                f"(drop {100 * drop:.2f} points {word} tolerance {100 * self.tolerance:.2f})")


@dataclass(frozen=True)
class GateDecision:
    verdict: str
    reason: str
    checks: list[Check] = field(default_factory=list)

    @property
    def promoted(self) -> bool:
        return self.verdict == PROMOTED


def _check(name: str, candidate: float | None, reference: float | None, tolerance: float) -> Check:
    candidate, reference = (math.nan if v is None else float(v) for v in (candidate, reference))
    passed = (candidate - reference) >= -tolerance - _EPS  # False for NaN (or a missing score) on either side
    return Check(name, candidate, reference, float(tolerance), bool(passed))


_LABELS = {"ood_mean": "OOD mean", "id": "ID", "hm": "HM"}


def _checks(rule: GateRule, candidate: Scores, reference: Scores, label: str) -> list[Check]:
    tolerance = {"ood_mean": rule.ood_tolerance, "id": rule.id_tolerance, "hm": rule.hm_tolerance}
    return [_check(f"{_LABELS[f]} vs {label}", getattr(candidate, f), getattr(reference, f), tolerance[f])
            for f in rule.fields]


def decide(candidate: Scores, zeroshot: Scores, champion: Scores | None = None, rule: GateRule = GateRule(), *,
           not_comparable: str | None = None, champion_label: str = CHAMPION) -> GateDecision:
    """The verdict for ``candidate``; pure, so every edge can be tested without a server."""
    checks = _checks(rule, candidate, zeroshot, "zero-shot")
    if not_comparable:
        return GateDecision(REJECTED, f"not comparable with the {champion_label}: {not_comparable}", checks)
    if champion is not None:
        checks += _checks(rule, candidate, champion, champion_label)
    failed = [c for c in checks if not c.passed]
    if failed:
        return GateDecision(REJECTED, "; ".join(c.describe() for c in failed), checks)
    against = f"zero-shot and the {champion_label}" if champion is not None else "zero-shot (no champion yet)"
    return GateDecision(PROMOTED, f"passes the gate against {against}: " + "; ".join(c.describe() for c in checks),
                        checks)


def _float_tag(tags: dict, key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, TypeError, ValueError):
        return None


def scores_from_tags(tags: dict, id_key: str = ID_TAG, ood_key: str = OOD_TAG, hm_key: str = HM_TAG,
                     rule: GateRule | None = None) -> Scores | None:
    """The scores a version's tags hold; None when a field ``rule`` compares (default: ID and OOD) is missing."""
    scores = Scores(_float_tag(tags, id_key), _float_tag(tags, ood_key), _float_tag(tags, hm_key))
    fields = rule.fields if rule is not None else ("id", "ood_mean")
    return None if any(getattr(scores, f) is None for f in fields) else scores


def zeroshot_from_tags(tags: dict, rule: GateRule | None = None) -> Scores | None:
    return scores_from_tags(tags, ZS_ID_TAG, ZS_OOD_TAG, ZS_HM_TAG, rule)


def _tag_names(rule: GateRule | None) -> str:
    return f"{HM_TAG}" if rule is not None and rule.metric == "hm" else f"{ID_TAG}/{OOD_TAG}"


def comparability(candidate_tags: dict, champion_tags: dict, champion_version: str,
                  rule: GateRule | None = None) -> str | None:
    """Why the champion cannot be compared with the candidate, or None when it can."""
    label = f"champion v{champion_version}"
    if scores_from_tags(champion_tags, rule=rule) is None:
        return f"{label} has no {_tag_names(rule)} tags (registered outside saft, or on another kind of suite?); " \
               "compare by hand"
    c_suite, h_suite = candidate_tags.get(SUITE_TAG), champion_tags.get(SUITE_TAG)
    if c_suite != h_suite:
        return (f"{label} was evaluated on suite {h_suite!r}, the candidate on {c_suite!r}; evaluate both on the "
                "same suite")
    c_fp, h_fp = candidate_tags.get(FINGERPRINT_TAG), champion_tags.get(FINGERPRINT_TAG)
    if c_fp != h_fp:
        return (f"{label} was trained on another base model (fingerprint {str(h_fp)[:12]}..., candidate "
                f"{str(c_fp)[:12]}...); register deltas of a new base under a new model name")
    return None


def get_alias(client, model_name: str, alias: str):
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _move_aliases(client, model_name: str, version: str, old_champion) -> None:
    if old_champion is not None:
        client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, str(old_champion.version))
        client.set_model_version_tag(model_name, str(old_champion.version), REPLACED_TAG, str(version))
    client.set_registered_model_alias(model_name, CHAMPION, version)


def _version_summary(mv) -> dict[str, Any]:
    tags = dict(mv.tags or {})
    return {"version": str(mv.version), "run_id": mv.run_id, "source": mv.source,
            "candidate_key": tags.get("saft.candidate_key"), "method": tags.get("saft.method"),
            "alpha": _float_tag(tags, "saft.alpha"), "suite": tags.get(SUITE_TAG),
            "base_fingerprint": tags.get(FINGERPRINT_TAG),
            "id": _float_tag(tags, ID_TAG), "ood_mean": _float_tag(tags, OOD_TAG), "hm": _float_tag(tags, HM_TAG)}


def apply_gate(client, model_name: str, version: str | int, rule: GateRule = GateRule(), *,
               run_id: str | None = None, where: str = "the MLflow registry") -> dict[str, Any]:
    """Decide on ``version`` (metrics from its tags), record the decision, move aliases; returns the audit.

    Linearizable: the whole read-decide-write runs under the registry lease on
    ``model_name`` (``saft.tracking.lease``), so concurrent gates take effect in some
    serial order and each audit is what the registry holds afterwards.
    """
    from saft.tracking.lease import RegistryLease

    with RegistryLease(client, model_name, f"promotion gate of v{version}", where=where) as lease:
        audit = _gate(client, model_name, str(version), rule, run_id, lease)
    audit["lease_wait_s"] = round(lease.waited_s, 3)
    return audit


def _gate(client, model_name: str, version: str, rule: GateRule, run_id: str | None, lease) -> dict[str, Any]:
    mv = client.get_model_version(model_name, version)
    tags = dict(mv.tags or {})
    champion = get_alias(client, model_name, CHAMPION)
    candidate = scores_from_tags(tags, rule=rule)
    zeroshot = zeroshot_from_tags(tags, rule)
    if candidate is None or zeroshot is None:
        needed = (HM_TAG, ZS_HM_TAG) if rule.metric == "hm" else (ID_TAG, OOD_TAG, ZS_ID_TAG, ZS_OOD_TAG)
        raise ValueError(f"{model_name} v{version} lacks the metric tags the gate ({rule.metric}) needs "
                         f"({', '.join(needed)}); register it with saft register")
    audit: dict[str, Any] = {
        "schema": AUDIT_SCHEMA, "model_name": model_name, "candidate": _version_summary(mv),
        "zeroshot": asdict(zeroshot), "rule": {"text": rule.text, **asdict(rule)},
        "champion": None if champion is None else _version_summary(champion), "checks": [], "repeated": False,
    }
    recorded = tags.get(VERDICT_TAG)
    if champion is not None and str(champion.version) == version:
        audit.update(verdict=ALREADY_CHAMPION, repeated=True,
                     reason=f"v{version} is already the champion; aliases unchanged")
    elif recorded == REJECTED:
        audit.update(verdict=REJECTED, repeated=True,
                     reason=f"decided earlier ({tags.get(TIME_TAG, 'unknown time')}), unchanged: {tags.get(REASON_TAG)}")
    elif recorded == PROMOTED:
        current = str(champion.version) if champion is not None else NO_CHAMPION
        if tags.get(COMPARED_TAG) == current:  # the earlier run stopped between its tags and the alias move
            lease.check()
            _move_aliases(client, model_name, version, champion)
            audit.update(verdict=PROMOTED, repeated=True,
                         reason=f"promotion recorded earlier is completed now: {tags.get(REASON_TAG)}")
        else:
            audit.update(verdict=PROMOTED, repeated=True,
                         reason=f"promoted earlier ({tags.get(TIME_TAG, 'unknown time')}); the champion has since "
                                f"moved to v{current}; aliases unchanged")
    else:
        not_comparable = None
        champ_scores = None
        if champion is not None:
            not_comparable = comparability(tags, dict(champion.tags or {}), str(champion.version), rule)
            champ_scores = None if not_comparable else scores_from_tags(dict(champion.tags or {}), rule=rule)
        decision = decide(candidate, zeroshot, champ_scores, rule, not_comparable=not_comparable,
                          champion_label=CHAMPION if champion is None else f"champion v{champion.version}")
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = {VERDICT_TAG: decision.verdict, REASON_TAG: decision.reason[:_REASON_LIMIT], RULE_TAG: rule.text,
                  OOD_TOL_TAG: repr(rule.ood_tolerance), ID_TOL_TAG: repr(rule.id_tolerance),
                  COMPARED_TAG: str(champion.version) if champion is not None else NO_CHAMPION, TIME_TAG: now}
        if run_id:
            record[RUN_TAG] = run_id
        lease.check()
        for key, value in record.items():  # the decision is on record before any alias moves
            client.set_model_version_tag(model_name, version, key, value)
        if decision.promoted:
            lease.check()
            _move_aliases(client, model_name, version, champion)
        audit.update(verdict=decision.verdict, reason=decision.reason, checks=[asdict(c) for c in decision.checks])
    after_champion = get_alias(client, model_name, CHAMPION)
    after_previous = get_alias(client, model_name, PREVIOUS_CHAMPION)
    audit["aliases"] = {CHAMPION: str(after_champion.version) if after_champion else None,
                        PREVIOUS_CHAMPION: str(after_previous.version) if after_previous else None}
    audit["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return audit
