"""Pipeline tasks of release: register the candidate behind the promotion gate, deploy the champion.

Kfp-free like :mod:`saft.orchestration.tasks` (whose helpers they use): one function per component.
"""

from __future__ import annotations

import json
from pathlib import Path

from saft.io import write_json
from saft.orchestration.tasks import (
    CANDIDATE_METRICS_FILE,
    METRICS_FILE,
    VERSION_FILE,
    _lineage_tags,
    _log,
    delta_runs,
)
from saft.steps.register import PIPELINE_DEFAULTS, RegisterConfig
from saft.steps.tracked import step_context
from saft.layout import DECISION, PREPARED

_REGISTER = RegisterConfig()  # the defaults of the step's one definition


def candidate_metrics(doc: dict, method: str, seed: int | None) -> dict:
    """The metrics document of one delta: ``method`` at ``seed`` (every alpha) and zero-shot.

    The registered delta is one seed's; its version must carry, and the gate must judge,
    that delta's own accuracy, not the mean over seeds of a benchmark.
    """
    from saft.eval.metrics import ZERO_SHOT, metrics_document, records_from_document

    records = [r for r in records_from_document(doc) if r.model == ZERO_SHOT or (r.model == method and r.seed == seed)]
    if not any(r.model == method for r in records):
        raise ValueError(f"register: the metrics hold no records of {method} seed {seed}")
    return metrics_document(records, {**doc.get("meta", {}), "candidate_seed": seed})


def register_task(model: str, results_dir: str, deltas_dir: str, data_dirs: list[str], out_dir: str, *,
                  method: str, model_name: str, promote: bool, ood_tolerance: float, id_tolerance: float,
                  baseline: bool = PIPELINE_DEFAULTS["baseline"], parent_run_id: str = "",
                  gate: str = _REGISTER.gate, hm_tolerance: float = _REGISTER.hm_tolerance,
                  tracking: bool = True) -> dict:
    """Register the lowest seed's delta of ``method``, judged on that delta's own metrics.

    ``tracking`` False (``--no-tracking``, ``tracking: false``): nothing is registered in any
    registry, whatever the environment points at; the decision says so.
    """
    from saft.steps.register import REGISTER_FILE, SKIPPED, register_step

    if not tracking:
        result = {"model_name": model_name, "version": None, "verdict": SKIPPED,
                  "reason": "tracking is off for this run (--no-tracking): nothing registered",
                  "summary": f"{model_name}: nothing registered (tracking is off for this run)"}
        write_json(Path(out_dir) / REGISTER_FILE, result)
        _log(result["summary"])
        return result

    runs = [r for r in delta_runs(deltas_dir) if r.name == method]
    if not runs:
        raise ValueError(f"register: no {method} delta among the finetune outputs")
    candidate = min(runs, key=lambda r: r.seed)
    data_dirs = list(data_dirs) or [str(p.parent) for p in Path(deltas_dir).glob("data-seed*/prepare.json")]
    records = {json.loads((Path(d) / PREPARED.record).read_text())["seed"]: d for d in data_dirs}
    if candidate.seed not in records:
        raise ValueError(f"register: no prepared data of seed {candidate.seed} (the candidate's) among {data_dirs}")
    data_dir = records[candidate.seed]
    own = Path(out_dir) / CANDIDATE_METRICS_FILE
    write_json(own, candidate_metrics(json.loads((Path(results_dir) / METRICS_FILE).read_text()), method,
                                      candidate.seed))
    cfg = RegisterConfig(model_name=model_name, method=method, promote=promote, ood_tolerance=ood_tolerance,
                         id_tolerance=id_tolerance, gate=gate, hm_tolerance=hm_tolerance, baseline=baseline)
    result = register_step(cfg, own, candidate.path, out_dir, base_model=model, data_dir=data_dir,
                           parent_run_id=parent_run_id or None)
    if result.get("version") and (Path(data_dir) / VERSION_FILE).is_file():
        _tag_version(model_name, result["version"], json.loads((Path(data_dir) / VERSION_FILE).read_text()))
    return result


def _tag_version(model_name: str, version: str, data_version: dict) -> None:
    """The data lineage on the registered model version (what it was trained on)."""
    from saft.steps.data_version import DataVersion
    from saft.tracking.config import make_client, resolve_config, tracking_call

    config = resolve_config()
    client = make_client(config)
    with tracking_call(config, f"tagging {model_name} v{version} with its data version"):
        for key, value in _lineage_tags(DataVersion.from_dict(data_version)).items():
            client.set_model_version_tag(model_name, version, key, value)


def deploy_config(settings: str | dict, *, model_name: str, version: str, image: str = ""):
    """params.yaml's ``deploy:`` section (as the pipeline's JSON) as a DeployConfig for ``version``; the predictor
    runs ``image`` (the pipeline's) unless the section names another."""
    from dataclasses import fields

    from saft.config import from_mapping
    from saft.serving.kserve import PredictorSettings
    from saft.serving.rollout import RolloutConfig
    from saft.steps.deploy import DeployConfig
    from saft.steps.params import DeployParams

    section = from_mapping(DeployParams, json.loads(settings) if isinstance(settings, str) else dict(settings),
                           source="deploy settings")
    part = {f.name: getattr(section, f.name) for f in fields(section)}
    predictor = PredictorSettings(**{f.name: part[f.name] for f in fields(PredictorSettings) if f.name in part})
    if not predictor.image and image:
        predictor = PredictorSettings(**{**{f.name: getattr(predictor, f.name) for f in fields(predictor)},
                                         "image": image})
    rollout = RolloutConfig(**{f.name: part[f.name] for f in fields(RolloutConfig)})
    return DeployConfig(model_name=model_name, version=str(version), predictor=predictor, rollout=rollout,
                        dry_run=section.dry_run)


def deploy_task(decision_dir: str, out_dir: str, *, model_name: str, settings: str | dict = "{}", image: str = "",
                parent_run_id: str = "", isvcs=None, smoke="default") -> dict:
    """Deploy the version the gate promoted (``register.json``), by canary; ``isvcs``/``smoke`` as in deploy_step."""
    from saft.steps.deploy import deploy_step

    decision = json.loads((Path(decision_dir) / DECISION.register).read_text())
    version = decision.get("version")
    if decision.get("verdict") != "promoted" or not version:
        raise ValueError(f"deploy: {decision_dir}/register.json holds no promoted version "
                         f"(verdict {decision.get('verdict')!r}); the pipeline deploys only on promotion")
    cfg = deploy_config(settings, model_name=model_name, version=str(version), image=image)
    with step_context("deploy", parent_run_id, {"model_name": model_name, "version": str(version),
                                                "dry_run": cfg.dry_run}) as tracker:
        doc = deploy_step(cfg, out_dir, isvcs=isvcs, smoke=smoke, log=_log)
        tracker.set_tags({"saft.deploy": str(doc.get("status", ""))})
    return doc
