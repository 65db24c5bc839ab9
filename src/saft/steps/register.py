"""The register step: metrics + delta -> MLflow model version and the promotion decision.

Reads the metrics document of the evaluate step (the candidate is the aggregate of
``cfg.method`` at ``cfg.alpha``; zero-shot is the ``zeroshot`` aggregate of the same
document), picks the gate's metric from the suite (``cfg.gate``: ``auto`` is HM on a
base-to-new suite, ID and OOD mean otherwise; see :mod:`saft.tracking.promotion`) and
fails before anything is logged when the document cannot be judged on it, checks that
the delta, the document and the base model belong together,
and in a nested ``register`` run: logs the pyfunc model (delta + base reference),
registers it as a version of ``cfg.model_name`` (once per candidate), applies the
promotion gate and writes the decision to ``out_dir/register.json``.

With ``baseline`` (and ``promote``), a model without a ``champion`` first gets the
zero-shot base registered as a version of its own, an empty delta served like any other
(tag ``saft.baseline``), which the gate promotes as the first champion: the model in
production before any fine-tuning, and the one every candidate must not fall behind.
The candidate is then judged against it, so ``models:/NAME@champion`` resolves after the
first run whatever the candidate's verdict.

Full fine-tuning baselines (dense deltas) are logged but not registered unless
``register_full``. With tracking off nothing is registered; ``register.json`` then
says so and reports how the candidate compares with zero-shot.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from saft.config import ConfigError, check, setting
from saft.eval.metrics import METRICS_SCHEMA, ZERO_SHOT
from saft.io import shorten, write_json
from saft.layout import DECISION, FINETUNE

REGISTER_FILE = DECISION.register
REGISTER_SCHEMA = "saft-register/1"
SKIPPED, NOT_REGISTERED, REGISTERED = "skipped", "not registered", "registered"
BASELINE_TAG = "saft.baseline"
BASELINE_ARTIFACT = "baseline-model"


GATES = ("auto", "id_ood", "hm")
TOLERANCES = ("ood_tolerance", "id_tolerance", "hm_tolerance")


@dataclass
class RegisterConfig:
    """The registry and the promotion gate: ``saft register``'s flags, ``params.yaml``'s ``register:`` section
    (without ``alpha``, ``register_full`` and ``experiment``) and the register component's parameters."""

    model_name: str = setting("saft-tiny", help="registered model name")
    method: str = setting("saft", help="the candidate: its model name in the metrics document, as given to "
                                       "evaluate --delta (a pipeline: the method whose delta is registered)")
    promote: bool = setting(True, help="apply the promotion gate after registering (off: register only)")
    ood_tolerance: float = setting(0.01, minimum=0.0, help="largest allowed drop of OOD mean top-1 against "
                                                           "zero-shot and the champion, as a fraction (0.01 = one "
                                                           "point)")
    id_tolerance: float = setting(0.01, minimum=0.0, help="largest allowed drop of ID top-1 against zero-shot and "
                                                          "the champion, as a fraction (0.01 = one point)")
    gate: str = setting("auto", choices=GATES,
                        help="what the gate compares: id_ood (ID and OOD mean), hm (base-to-new harmonic mean), or "
                             "auto: hm on a base-to-new suite, id_ood otherwise")
    hm_tolerance: float = setting(0.01, minimum=0.0, help="largest allowed drop of the base-to-new HM against "
                                                          "zero-shot and the champion, as a fraction (gate hm)")
    baseline: bool = setting(False, help="when the model has no champion yet, first register the zero-shot base "
                                         "(an empty delta) and promote it, so the candidate is judged against it and "
                                         "a champion always exists (default on in params.yaml, off for saft register)")
    alpha: float = setting(1.0, help="candidate's delta scale: its aggregate at this alpha is compared and served")
    register_full: bool = setting(False, help="register a full fine-tuning (dense) delta too; by default "
                                              "baselines are only logged")
    experiment: str = setting("saft", help="MLflow experiment of a standalone run (no --parent-run-id)")

    def __post_init__(self) -> None:
        check(self)
        for name in TOLERANCES:
            if not getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a fraction in [0, 1) (0.01 = one point of top-1), got "
                                  f"{getattr(self, name):g}")


PIPELINE_DEFAULTS = {"baseline": True}
"""Where ``params.yaml``'s ``register:`` default differs from ``saft register``'s: a pipeline run registers the
zero-shot base as the first champion (so ``models:/NAME@champion`` resolves after it); on the command line that
is opt-in (``--baseline``)."""
CLI_ONLY = ("alpha", "register_full", "experiment")
"""Settings of ``saft register`` a pipeline does not take: it registers the delta at alpha 1, never a dense
baseline, under the run's parent."""


def read_metrics(path: str | Path) -> dict:
    from saft.io import read_text

    text = read_text(path, "metrics file", ValueError)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"metrics file {path} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != METRICS_SCHEMA:
        raise ValueError(f"metrics file {path} is not a {METRICS_SCHEMA} document (write it with `saft evaluate`)")
    return doc


def document_gate(doc: dict, requested: str = "auto", path: str | Path = "metrics") -> str:
    """The gate metric a metrics document supports (see :func:`saft.tracking.promotion.gate_metric`)."""
    from saft.tracking.promotion import gate_metric

    roles = {r.get("role") for r in doc.get("records", [])}
    return gate_metric(roles, requested, f"{path} (suite {doc.get('meta', {}).get('suite')!r})")


def select_aggregate(doc: dict, model: str, alpha: float | None, path: str | Path = "metrics",
                     gate: str = "id_ood") -> dict:
    """The aggregate of ``model`` at ``alpha`` (zero-shot has none), with the scores ``gate`` compares."""
    need = ("hm",) if gate == "hm" else ("id", "ood_mean")
    for agg in doc.get("aggregates", []):
        if agg.get("model") != model:
            continue
        if model != ZERO_SHOT:  # a delta evaluated without an explicit alpha was merged at alpha 1
            a = 1.0 if agg.get("alpha") is None else agg["alpha"]
            if not math.isclose(a, 1.0 if alpha is None else alpha, abs_tol=1e-9):
                continue
        if any(k not in agg for k in need):
            raise ValueError(f"{path}: {model} has no {'/'.join(need)} aggregate (suite "
                             f"{doc.get('meta', {}).get('suite')!r}); the promotion gate ({gate}) cannot judge it")
        return agg
    have = ", ".join(f"{a.get('model')}" + ("" if a.get("alpha") is None else f"@{a['alpha']:g}")
                     for a in doc.get("aggregates", []))
    what = f"{model} at alpha {alpha:g}" if alpha is not None and model != ZERO_SHOT else model
    hint = " (evaluate without --no-zeroshot)" if model == ZERO_SHOT else " (check --method and the alpha)"
    raise ValueError(f"{path}: no aggregate for {what}{hint}; the document has: {have or 'none'}")


def _is_full(delta, method: str) -> bool:
    return method == "full" or any(not delta.is_sparse(name) for name in delta.values)


def _candidate(cfg: RegisterConfig, metrics_path, delta_path, base_model: str, verify_base: bool):
    """(metrics document, delta, CandidateInfo), after checking that the three belong together."""
    from saft.models import load_model
    from saft.sparse import load_delta
    from saft.tracking.pyfunc import sha256_file
    from saft.tracking.registry import CandidateInfo

    doc = read_metrics(metrics_path)
    gate = document_gate(doc, cfg.gate, metrics_path)
    cand = select_aggregate(doc, cfg.method, cfg.alpha, metrics_path, gate)
    zs = select_aggregate(doc, ZERO_SHOT, None, metrics_path, gate)
    delta = load_delta(delta_path)
    meta = doc.get("meta", {})
    doc_fp = meta.get("base_fingerprint")
    if doc_fp and doc_fp != delta.base_fingerprint:
        raise ValueError(f"{metrics_path} was evaluated on base {doc_fp[:12]}... but {delta_path} was trained on "
                         f"{delta.base_fingerprint[:12]}...: register the delta with its own evaluation")
    if verify_base:
        loaded = load_model(base_model)
        if loaded.fingerprint != delta.base_fingerprint:
            raise ValueError(f"base model {base_model} has weights {loaded.fingerprint[:12]}..., the delta was trained "
                             f"on {delta.base_fingerprint[:12]}... ({delta.meta.get('base_model', 'unknown spec')}); "
                             "pass the delta's base with --model")
    mean = lambda agg, key: agg[key]["mean"] if key in agg else None  # noqa: E731
    info = CandidateInfo(method=cfg.method, alpha=float(cfg.alpha), suite=str(meta.get("suite", "unknown")),
                         base_model=str(base_model), base_fingerprint=delta.base_fingerprint,
                         delta_sha256=sha256_file(delta_path), delta_bytes=Path(delta_path).stat().st_size,
                         id=mean(cand, "id"), ood_mean=mean(cand, "ood_mean"), zeroshot_id=mean(zs, "id"),
                         zeroshot_ood_mean=mean(zs, "ood_mean"), hm=mean(cand, "hm"), zeroshot_hm=mean(zs, "hm"))
    return doc, delta, info, gate


def candidate_scores(info) -> tuple:
    """(candidate, zero-shot) Scores of a CandidateInfo."""
    from saft.tracking.promotion import Scores

    return (Scores(info.id, info.ood_mean, info.hm),
            Scores(info.zeroshot_id, info.zeroshot_ood_mean, info.zeroshot_hm))


def _unregistered(tracking_on: bool, info, rule) -> dict:
    """Verdict and reason when nothing is registered, with the zero-shot checks as advice."""
    from saft.tracking.promotion import decide

    advisory = decide(*candidate_scores(info), None, rule)
    if not tracking_on:
        return {"verdict": SKIPPED, "checks": [asdict(c) for c in advisory.checks],
                "reason": f"tracking is off (SAFT_TRACKING=off): nothing registered; against zero-shot the gate "
                          f"would have {advisory.verdict} it ({advisory.reason})"}
    return {"verdict": NOT_REGISTERED, "checks": [asdict(c) for c in advisory.checks],
            "reason": "a full fine-tuning baseline (dense delta) is logged, not registered: the registry holds sparse "
                      "deltas; pass register_full (--register-full) to register it anyway"}


def _bootstrap_baseline(tracker, cfg: RegisterConfig, rule, doc: dict, info, data, base_model: str,
                        out_dir: Path) -> dict | None:
    """Register and promote the zero-shot base when ``cfg.model_name`` has no champion; None when it has one."""
    from dataclasses import replace

    from saft.sparse import Delta
    from saft.tracking.config import tracking_call
    from saft.tracking.promotion import CHAMPION, apply_gate, get_alias
    from saft.tracking.pyfunc import model_reference, sha256_file
    from saft.tracking.registry import candidate_key, register_delta

    with tracking_call(tracker.config, f"reading the {CHAMPION} alias of {cfg.model_name}"):
        if get_alias(tracker.client, cfg.model_name, CHAMPION) is not None:
            return None
    empty = Delta({}, {}, info.base_fingerprint, {"method": ZERO_SHOT, "base_model": str(base_model)})
    path = empty.save(out_dir / "baseline" / FINETUNE.delta)
    # keyed on what identifies the zero-shot model only, so later candidates never re-register it
    zs = select_aggregate(doc, ZERO_SHOT, None, gate=rule.metric)
    key = candidate_key(path, {"suite": info.suite, "base_fingerprint": info.base_fingerprint, "zeroshot": zs},
                        method=ZERO_SHOT, alpha=0.0)
    binfo = replace(info, method=ZERO_SHOT, alpha=0.0, id=info.zeroshot_id, ood_mean=info.zeroshot_ood_mean,
                    hm=info.zeroshot_hm, delta_sha256=sha256_file(path), delta_bytes=path.stat().st_size)
    reference = model_reference(base_model=str(base_model), base_fingerprint=info.base_fingerprint,
                                classes=data.classes, templates=data.templates, alpha=0.0, method=ZERO_SHOT,
                                delta_sha256=binfo.delta_sha256)
    mv, created = register_delta(tracker, model_name=cfg.model_name, delta_path=path, reference=reference, info=binfo,
                                 key=key, artifact_path=BASELINE_ARTIFACT, extra_tags={BASELINE_TAG: "true"},
                                 description="zero-shot baseline (the base model, empty delta)")
    with tracking_call(tracker.config, f"promoting the zero-shot baseline {cfg.model_name} v{mv.version}"):
        audit = apply_gate(tracker.client, cfg.model_name, mv.version, rule, run_id=tracker.run_id,
                           where=tracker.config.where)
    return {"version": str(mv.version), "created": created, "verdict": audit["verdict"], "reason": audit["reason"],
            "candidate_key": key}


def register_step(cfg: RegisterConfig, metrics_path: str | Path, delta_path: str | Path, out_dir: str | Path, *,
                  base_model: str, data_dir: str | Path, parent_run_id: str | None = None,
                  verify_base: bool = True) -> dict:
    """Register the candidate and decide on promotion; returns the decision written to ``register.json``.

    ``data_dir`` is the prepared data folder whose class names and templates the served
    model classifies with. ``verify_base`` loads ``base_model`` once to check that its
    weights are the delta's base (a mismatch would only surface when serving).
    """
    from saft.steps.prepared import PreparedData
    from saft.tracking.config import probe, resolve_config, tracking_enabled
    from saft.tracking.promotion import GateRule, apply_gate
    from saft.tracking.pyfunc import model_reference
    from saft.tracking.registry import candidate_key, check_model_name, register_delta
    from saft.tracking.config import tracking_call
    from saft.tracking.runs import step_run

    check_model_name(cfg.model_name)
    GateRule(cfg.ood_tolerance, cfg.id_tolerance, "id_ood", cfg.hm_tolerance)  # bad tolerances fail first
    if tracking_enabled():
        probe(resolve_config())  # a dead server fails now, before the base model is loaded
    data = PreparedData.open(data_dir)
    doc, delta, info, gate = _candidate(cfg, metrics_path, delta_path, base_model, verify_base)
    rule = GateRule(cfg.ood_tolerance, cfg.id_tolerance, gate, cfg.hm_tolerance)
    key = candidate_key(delta_path, doc, method=cfg.method, alpha=cfg.alpha)
    reference = model_reference(base_model=str(base_model), base_fingerprint=delta.base_fingerprint,
                                classes=data.classes, templates=data.templates, alpha=cfg.alpha, method=cfg.method,
                                delta_sha256=info.delta_sha256)
    params = {"register": asdict(cfg), "metrics": str(metrics_path), "delta": str(delta_path),
              "data": str(data_dir), "base_model": str(base_model)}
    with step_run("register", parent_run_id, params, experiment=cfg.experiment) as tracker:
        scores = {"candidate.id": info.id, "candidate.ood_mean": info.ood_mean, "candidate.hm": info.hm,
                  "zeroshot.id": info.zeroshot_id, "zeroshot.ood_mean": info.zeroshot_ood_mean,
                  "zeroshot.hm": info.zeroshot_hm}
        tracker.log_metrics({k: v for k, v in scores.items() if v is not None})
        tracker.set_tags({"saft.candidate_key": key, "saft.method": cfg.method})
        result = {"schema": REGISTER_SCHEMA, "model_name": cfg.model_name, "version": None, "created": False,
                  "candidate_key": key, "candidate": asdict(info),
                  "zeroshot": asdict(candidate_scores(info)[1]), "champion": None,
                  "rule": {"text": rule.text, **asdict(rule)}, "checks": [], "repeated": False, "aliases": {},
                  "baseline": None}
        if not tracker.enabled or (_is_full(delta, cfg.method) and not cfg.register_full):
            result.update(_unregistered(tracker.enabled, info, rule))
        else:
            if cfg.promote and cfg.baseline:
                result["baseline"] = _bootstrap_baseline(tracker, cfg, rule, doc, info, data, str(base_model),
                                                         Path(out_dir))
            mv, created = register_delta(tracker, model_name=cfg.model_name, delta_path=delta_path,
                                         reference=reference, info=info, key=key)
            result.update(version=str(mv.version), created=created)
            if cfg.promote:
                with tracking_call(tracker.config, f"applying the promotion gate to {cfg.model_name} v{mv.version}"):
                    audit = apply_gate(tracker.client, cfg.model_name, mv.version, rule, run_id=tracker.run_id,
                                       where=tracker.config.where)
                audit.pop("schema")
                registered = {k: v for k, v in audit.pop("candidate").items() if v is not None}
                result.update(audit, candidate={**result["candidate"], **registered})
            else:
                result.update(verdict=REGISTERED, reason="registered; promotion not requested (promote=False)")
            tracker.set_tags({"saft.registered_version": str(mv.version), "saft.promotion.verdict": result["verdict"]})
        where = f"{cfg.model_name} v{result['version']}" if result["version"] else f"{cfg.model_name}: nothing registered"
        result["summary"] = f"{where}: {result['verdict']} ({shorten(result['reason'])})"
        if result.get("baseline"):
            b = result["baseline"]
            result["summary"] = (f"{cfg.model_name} v{b['version']} (zero-shot baseline, the first champion): "
                                 f"{b['verdict']}; candidate {result['summary']}")
            tracker.set_tags({"saft.baseline_version": b["version"]})
        result.update(run_id=tracker.run_id, parent_run_id=parent_run_id,
                      tracking_uri=tracker.config.display if tracker.config else None,
                      timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        write_json(Path(out_dir) / REGISTER_FILE, result)
        tracker.log_artifact(Path(out_dir) / REGISTER_FILE, "promotion")
    return result


__all__ = ["BASELINE_TAG", "CLI_ONLY", "GATES", "PIPELINE_DEFAULTS", "REGISTER_FILE", "RegisterConfig", "document_gate",
           "read_metrics", "register_step", "select_aggregate"]
