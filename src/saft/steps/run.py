"""``saft run``: the whole pipeline in one process, from ``params.yaml``.

world (embedded default only) -> per seed: prepare -> score (SAFT mask, random mask) ->
finetune (each method) -> evaluate (every model on the suite) -> collect (table,
report, validity checks) -> register (MLflow model version + promotion gate).

The same step functions run under Kubeflow (one component each, ``saft.orchestration``)
and DVC (``dvc.yaml``). Every step skips itself when its outputs already exist for the
same inputs and parameters, so a re-run after a crash continues where it stopped.
Layout under ``out_dir``::

    params.resolved.yaml
    world/                      the embedded world (when data.root is empty)
    seed<N>/data/               few-shot manifests
    seed<N>/mask-saft/          mask.safetensors, mask_stats.json
    seed<N>/mask-random/
    seed<N>/<method>/           delta.safetensors, history.json, finetune.json
    eval/                       metrics.json, report.html, results.json, results.md
    register/register.json      the registry decision
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from saft.eval.suites import load_suite
from saft.sparse import FinetuneConfig
from saft.steps.collect import collect_step, results_text
from saft.steps.evaluate import DeltaRun, EvaluateConfig, evaluate_suite
from saft.steps.finetune import DELTA_FILE
from saft.steps.params import PipelineParams, resolve_device, write_resolved
from saft.steps.score import ScoreConfig
from saft.steps.tasks import (candidate_metrics, config_from_settings, finetune_settings, finetune_task, prepare_task,
                              score_task)
from saft.steps.tracked import step_context
from saft.steps.world import world_step


def score_config(params: PipelineParams, kind: str, seed: int) -> ScoreConfig:
    s = params.score
    return ScoreConfig(model=params.model, density=s.density, rule=s.rule, kind=kind, include=list(s.include),
                       exclude=list(s.exclude), batch_size=s.batch_size, seed=seed, device=params.device)


def finetune_config(params: PipelineParams, method: str, seed: int) -> FinetuneConfig:
    """Every ``finetune`` setting of params.yaml (``epochs`` is applied by the finetune task)."""
    return config_from_settings(finetune_settings(params.finetune), method=method, lr=params.finetune.lr[method],
                                seed=seed)


def evaluate_config(params: PipelineParams, deltas: list[DeltaRun], only: list[str] = ()) -> EvaluateConfig:
    e = params.evaluate
    return EvaluateConfig(model=params.model, deltas=deltas, alphas=list(e.alphas), batch_size=e.batch_size,
                          device=params.device, only=list(only))


def mask_kind(method: str) -> str | None:
    return None if method == "full" else method


def run_pipeline(params: PipelineParams, out_dir: str | Path, *, tracking: bool = True, progress: bool = False,
                 log: Callable[[str], None] = print) -> dict:
    """Run every step into ``out_dir``; return the collect step's summary (plus registry decision)."""
    t0 = time.perf_counter()
    params.device = resolve_device(params.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(params, out)
    parent = None
    if tracking:
        from saft.tracking.runs import start_pipeline_run

        parent = start_pipeline_run(f"saft-run {out.name}", params.to_dict(), {"saft.out_dir": str(out.resolve())})
        log(f"MLflow parent run {parent}")

    def step(name: str, step_params: dict | None = None):
        return step_context(name, parent, step_params)

    status = "FAILED"
    try:
        summary = _run_steps(params, out, step, parent, tracking, progress, log)
        status = "FINISHED"
    finally:
        if parent is not None:
            from saft.tracking.runs import end_pipeline_run

            end_pipeline_run(parent, status)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    log("")
    log(results_text(summary))
    if summary.get("register"):
        log(f"\nregistry: {summary['register'].get('summary', summary['register'])}")
    log(f"\nreport: {out / 'eval' / 'report.html'}   results: {out / 'eval' / 'results.json'}")
    log(f"total {summary['seconds']:.0f} s")
    return summary


def _run_steps(params: PipelineParams, out: Path, step, parent: str | None, tracking: bool, progress: bool,
               log) -> dict:
    train_root, suite_path, data_root = params.data.root, params.evaluate.suite, params.evaluate.data_root or None
    if params.embedded:
        with step("world", {"world": params.world.__dict__}):
            world = world_step(out / "world", params.world, log=log)
        train_root = world["train_root"]
        if not suite_path:
            suite_path, data_root = world["suite"], world["root"]
    if not suite_path:
        raise ValueError("params: evaluate.suite is empty; name a suite (e.g. imagenet-shifts) or a suite YAML file")
    runs: list[DeltaRun] = []
    for seed in params.seeds:
        seed_dir = out / f"seed{seed}"
        d = params.data
        prepare_task(str(out / "world"), str(seed_dir / "data"), data_root=train_root, dataset=d.dataset,
                     split=d.split, shots=d.shots, val_shots=d.val_shots, seed=seed, parent_run_id=parent or "")
        log(f"seed {seed}: prepared {seed_dir / 'data'}")
        masks = {}
        for kind in sorted({mask_kind(m) for m in params.finetune.methods} - {None}):
            stats = score_task(str(seed_dir / "data"), str(seed_dir / f"mask-{kind}"), score_config(params, kind, seed),
                               parent or "", progress=progress, log=log)
            masks[kind] = seed_dir / f"mask-{kind}"
            log(f"seed {seed}: {kind} mask, {stats['num_selected']:,} entries")
        for method in params.finetune.methods:
            cfg = finetune_config(params, method, seed)
            result = finetune_task(params.model, str(seed_dir / "data"), masks.get(mask_kind(method)),
                                   str(seed_dir / method), cfg, device=params.device, parent_run_id=parent or "",
                                   progress=progress, log=log, epochs=params.finetune.epochs)
            log(f"seed {seed}: {method} lr {cfg.lr:g}, {result['trained_values']:,} values, "
                f"final loss {result['final_loss']:.3f}")
            runs.append(DeltaRun(method, str(seed_dir / method / DELTA_FILE), seed))
    suite = load_suite(str(suite_path), data_root)
    ecfg = evaluate_config(params, runs)
    with step("evaluate", {"suite": suite.name, "alphas": ecfg.alphas}) as tracker:
        log(f"evaluating the {suite.name} suite ({len(suite.entries)} datasets, {len(runs) + 1} models)")
        evaluate_suite(ecfg, suite, out / "eval", progress=progress, log=lambda *_: None)
        summary = collect_step([out / "eval" / "metrics.json"], out / "eval", deltas=runs,
                               learning_rates={m: params.finetune.lr[m] for m in params.finetune.methods})
        tracker.log_metrics_document(json.loads((out / "eval" / "metrics.json").read_text()))
        tracker.log_report(str(out / "eval"))
    if params.register.enabled and not tracking:
        log("register: skipped (tracking is off; the registry lives in MLflow)")
    elif params.register.enabled:
        summary["register"] = _register(params, out, runs, parent)
    return summary


def _register(params: PipelineParams, out: Path, runs: list[DeltaRun], parent: str | None) -> dict:
    """Register the first seed's delta of ``register.method``, judged on that delta's own metrics."""
    from saft.io import write_json
    from saft.steps.register import RegisterConfig, register_step

    r = params.register
    candidate = min((run for run in runs if run.name == r.method), key=lambda run: run.seed)
    own = out / "register" / "candidate_metrics.json"
    write_json(own, candidate_metrics(json.loads((out / "eval" / "metrics.json").read_text()), r.method,
                                      candidate.seed))
    cfg = RegisterConfig(model_name=r.model_name, method=r.method, promote=r.promote,
                         ood_tolerance=r.ood_tolerance, id_tolerance=r.id_tolerance, baseline=r.baseline)
    return register_step(cfg, own, candidate.path, out / "register",
                         base_model=params.model, data_dir=Path(candidate.path).parent.parent / "data",
                         parent_run_id=parent)


__all__ = ["run_pipeline", "score_config", "finetune_config", "evaluate_config"]
