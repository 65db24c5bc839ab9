"""``saft run``: the whole pipeline in one process, from ``params.yaml``.

world (embedded default only) -> per seed: prepare -> score (SAFT mask, random mask, as the
methods need) -> each trained method of ``finetune.methods`` over its learning-rate grid,
the rate chosen on ID validation, and WiSE-FT's alpha on the same split
(:mod:`saft.orchestration.tune`) -> evaluate (every model on the suite) -> collect (table,
report, validity checks) -> register (MLflow model version + promotion gate).

Base-to-new (``data.subset: base``): on the embedded world the ``synthshift-b2n`` suite;
with a suite of several datasets (``base2new``) one training per dataset and seed, each
evaluated on its own halves (:mod:`saft.orchestration.plan`), merged by collect. The protocol and
the gate's inputs are checked before the first step that trains.

The same step functions run under Kubeflow (one component each, ``saft.orchestration``)
and DVC (``dvc.yaml``). Every step skips itself when its outputs already exist for the
same inputs and parameters, so a re-run after a crash continues where it stopped.
Layout under ``out_dir``::

    params.resolved.yaml
    world/                      the embedded world (when data.root is empty)
    seed<N>/data/               few-shot manifests
    seed<N>/mask-saft/          mask.safetensors, mask_stats.json
    seed<N>/mask-random/
    seed<N>/<method>/           delta.safetensors, history.json, finetune.json (the chosen rate's run;
                                lr-<rate>/ and select/ when a grid was searched; wiseft/ beside full's)
    seed<N>/<dataset>/...       the same per dataset, for a base-to-new suite of several
    eval/                       metrics.json, report.html, results.json, results.md
    eval/parts/<dataset>/       per-dataset evaluations (base-to-new suite of several)
    register/register.json      the registry decision
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from saft.eval.suites import load_suite
from saft.sparse.config import MASK_METHODS
from saft.steps.collect import collect_step, results_text
from saft.steps.configs import WISEFT, DeltaRun
from saft.orchestration.eval_tasks import rates_of_deltas
from saft.steps.evaluate import evaluate_suite
from saft.sparse.distributed import resolve_device
from saft.steps.params import PipelineParams, write_resolved
from saft.orchestration.plan import TrainingTask, check_protocol, training_plan
from saft.steps.score import ScoreConfig
from saft.orchestration.release_tasks import candidate_metrics
from saft.orchestration.tasks import prepare_task, score_task
from saft.steps.tracked import step_context
from saft.orchestration.tune import tune_task
from saft.steps.world import world_step, world_suite
from saft.layout import DECISION, EVAL, FINETUNE


def report_settings(params: PipelineParams, plan: list[TrainingTask]) -> dict:
    """The run's settings as the report shows them beside what each delta records."""
    d, f, s = params.data, params.finetune, params.score
    if len(plan) > 1:
        data = {"datasets": ", ".join(t.name for t in plan), "root": "each dataset's suite root", "shots": d.shots,
                "subset": d.subset}
    else:
        data = {"dataset": d.dataset, "root": d.root or "the embedded world's ID pool", "split": d.split,
                "shots": d.shots, "subset": d.subset}
    out = {"data": data, "density": s.density, "score rule": s.rule, "batch size": f.batch_size,
           "warm-up steps": f.warmup_steps, "weight decay": f.weight_decay}
    grids = {m: params.lr_grid(m) for m in params.trained_methods() if len(params.lr_grid(m)) > 1}
    if grids:
        out["learning-rate grids (chosen on ID validation)"] = "; ".join(
            f"{m} {', '.join(f'{x:g}' for x in g)}" for m, g in grids.items())
    if "lora" in f.methods:
        out["lora"] = f"rank {f.lora_rank}, lora_alpha {f.lora_alpha:g}, targets {', '.join(f.lora_targets)}"
    if "lpft" in f.methods:
        out["lpft probe"] = f"{f.probe_steps} full-batch steps at lr {f.probe_lr:g}"
    if params.wiseft_alphas():
        out["wiseft alphas (chosen on ID validation)"] = ", ".join(f"{a:g}" for a in params.wiseft_alphas())
    return out


def mask_kind(method: str) -> str | None:
    return method if method in MASK_METHODS else None


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
    log(f"\nreport: {out / 'eval' / EVAL.report_html}   results: {out / 'eval' / EVAL.results}")
    log(f"total {summary['seconds']:.0f} s")
    return summary


def _run_steps(params: PipelineParams, out: Path, step, parent: str | None, tracking: bool, progress: bool,
               log) -> dict:
    train_root, suite_path, data_root = params.data.root, params.evaluate.suite, params.evaluate.data_root or None
    if params.embedded:
        with step("world", {"world": params.world.__dict__}):
            world = world_step(out / "world", params.world, log=log)
        train_root = world["train_root"]
        name = world_suite(suite_path, params.data.subset)
        if name:
            suite_path, data_root = str(Path(world["root"]) / name), world["root"]
    if not suite_path:
        raise ValueError("params: evaluate.suite is empty; name a suite (e.g. imagenet-shifts) or a suite YAML file")
    suite = load_suite(str(suite_path), data_root)
    plan = training_plan(params, suite, train_root)
    gate = check_protocol(params, suite, plan)  # before anything trains
    runs: dict[str, list[DeltaRun]] = {task.name: [] for task in plan}
    for seed in params.seeds:
        for task in plan:
            runs[task.name] += _train(params, task, out, seed, parent, progress, log)
    all_runs = [run for task in plan for run in runs[task.name]]
    with step("evaluate", {"suite": suite.name, "alphas": list(params.evaluate.alphas)}) as tracker:
        log(f"evaluating the {suite.name} suite ({len(suite.entries)} datasets: "
            f"{', '.join(params.finetune.methods)})")
        if len(plan) == 1:  # every entry named: a part without a report, written once below by collect
            evaluate_suite(params.evaluate_config(all_runs, [e.name for e in suite.entries]), suite, out / "eval",
                           progress=progress, log=lambda *_: None)
            parts = [out / "eval" / EVAL.metrics]
        else:  # each dataset's deltas score that dataset's halves only
            parts = []
            for task in plan:
                part = out / "eval" / "parts" / task.folder
                evaluate_suite(params.evaluate_config(runs[task.name], task.entries), suite, part,
                               progress=progress, log=lambda *_: None)
                parts.append(part / EVAL.metrics)
        summary = collect_step(parts, out / "eval", deltas=all_runs,
                               learning_rates=rates_of_deltas([str(Path(r.path).parent) for r in all_runs
                                                               if r.alpha is None]),
                               settings=report_settings(params, plan))
        tracker.log_metrics_document(json.loads((out / "eval" / EVAL.metrics).read_text()))
        tracker.log_report(str(out / "eval"))
    if params.register.enabled and not tracking:
        log("register: skipped (tracking is off; the registry lives in MLflow)")
    elif params.register.enabled:
        summary["register"] = _register(params, out, runs[plan[0].name], parent, gate)
    return summary


def _train(params: PipelineParams, task: TrainingTask, out: Path, seed: int, parent: str | None,
           progress: bool, log) -> list[DeltaRun]:
    """prepare -> score -> finetune of one task and seed; the deltas it wrote."""
    task_dir = out / f"seed{seed}" / task.folder
    what = f"seed {seed}" + (f" {task.name}" if task.name else "")
    prepare_task(str(out / "world"), str(task_dir / "data"), params.prepare_config(seed, task.dataset, task.split),
                 data_root=task.root, parent_run_id=parent or "")
    log(f"{what}: prepared {task_dir / 'data'}")
    masks = {}
    for kind in sorted({mask_kind(m) for m in params.trained_methods()} - {None}):
        stats = score_task(str(task_dir / "data"), str(task_dir / f"mask-{kind}"), params.score_config(kind, seed),
                           parent or "", progress=progress, log=log)
        masks[kind] = task_dir / f"mask-{kind}"
        log(f"{what}: {kind} mask, {stats['num_selected']:,} entries")
    runs = []
    for method in params.trained_methods():
        cfg = params.finetune_config(method, seed)
        wiseft = params.wiseft_alphas() if method == "full" else []
        result = tune_task(str(task_dir / "data"), masks.get(mask_kind(method)), str(task_dir / method), cfg,
                           params.lr_grid(method), wiseft_alphas=wiseft, parent_run_id=parent or "",
                           progress=progress, log=log)
        log(f"{what}: {method} lr {result['lr']:g}, {result['trained_values']:,} values, "
            f"final loss {result['final_loss']:.3f}")
        runs.append(DeltaRun(method, str(task_dir / method / FINETUNE.delta), seed))
        if wiseft:
            runs.append(DeltaRun(WISEFT, runs[-1].path, seed, result["wiseft_alpha"]))
            log(f"{what}: wiseft alpha {result['wiseft_alpha']:g} (chosen on ID validation)")
    return runs



def _register(params: PipelineParams, out: Path, runs: list[DeltaRun], parent: str | None, gate: str) -> dict:
    """Register the first seed's delta of ``register.method``, judged on that delta's own metrics."""
    from saft.io import write_json
    from saft.steps.register import register_step

    r = params.register
    candidate = min((run for run in runs if run.name == r.method), key=lambda run: run.seed)
    own = out / "register" / DECISION.candidate_metrics
    write_json(own, candidate_metrics(json.loads((out / "eval" / EVAL.metrics).read_text()), r.method,
                                      candidate.seed))
    return register_step(params.register_config(gate), own, candidate.path, out / "register",
                         base_model=params.model, data_dir=Path(candidate.path).parent.parent / "data",
                         parent_run_id=parent)


__all__ = ["run_pipeline"]
