"""Pipeline tasks over artifact folders: one function per Kubeflow component.

A Kubeflow task sees its inputs as local folders (the artifacts of upstream tasks,
copied or mounted into its pod) and writes its outputs into folders it is given. These
functions adapt the step functions to that shape: plain strings, numbers and folder
paths in, files in the output folders out, and the same steps, record files and
tracking as ``saft run``. They import no kfp, so they are tested without a cluster.

Embedded default: the ``world`` task renders the world into its artifact; an empty
``data_root``/``suite`` downstream means "the world artifact's pool/suite".
"""

from __future__ import annotations

import json
from pathlib import Path

# Light imports only: every task is a fresh process, and most need neither torch nor
# matplotlib until they do real work, so the heavy modules are imported where used.
from saft.io import write_json
from saft.steps.params import WorldParams, resolve_device
from saft.steps.tracked import step_context

MASK_FILE = "mask.safetensors"
DELTA_FILE = "delta.safetensors"
HISTORY_FILE = "history.json"
FINETUNE_FILE = "finetune.json"
METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
EXTERNAL_FILE = "external.json"


def _log(msg: str) -> None:
    print(msg, flush=True)


def start_task(params: dict, run_name: str, tracking: bool, run_dir: str) -> str:
    """Open the pipeline's parent MLflow run; write its id ("" when untracked) to ``run_dir``."""
    run_id = ""
    if tracking:
        from saft.tracking.runs import start_pipeline_run

        run_id = start_pipeline_run(run_name, params)
    write_json(Path(run_dir) / RUN_FILE, {"parent_run_id": run_id})
    return run_id


def parent_run(run_dir: str) -> str:
    return json.loads((Path(run_dir) / RUN_FILE).read_text())["parent_run_id"]


def finish_task(parent_run_id: str) -> None:
    if not parent_run_id:
        return
    from saft.tracking.runs import end_pipeline_run

    end_pipeline_run(parent_run_id, "FINISHED")


def world_task(out_dir: str, data_root: str, pool_per_class: int, test_per_class: int) -> None:
    """Render the embedded world, or record that the data lives elsewhere (``data_root``)."""
    if data_root:
        write_json(Path(out_dir) / EXTERNAL_FILE, {"data_root": data_root})
        return
    from saft.steps.world import world_step

    world_step(out_dir, WorldParams(pool_per_class, test_per_class), log=_log)


def train_root(world_dir: str, data_root: str) -> str:
    from saft.steps.world import POOL_DIR

    return data_root or str(Path(world_dir) / POOL_DIR)


def resolve_suite(world_dir: str, suite: str, data_root: str, subset: str = "all"):
    """The suite a task evaluates: the world's own (``""``, ``synthshift``, ``synthshift-b2n``; ``""`` with
    ``subset="base"`` is the base-to-new variant) when the world task rendered one, else a built-in or a file."""
    from saft.eval.suites import load_suite
    from saft.steps.world import world_suite

    name = world_suite(suite, subset)
    if name and (Path(world_dir) / name).is_file():
        return load_suite(str(Path(world_dir) / name), world_dir)
    if suite:
        return load_suite(suite, data_root or None)
    raise ValueError("no evaluation suite: set `suite` (a built-in name or YAML file) when data_root is given")


def prepare_task(world_dir: str, out_dir: str, *, data_root: str, dataset: str, split: str, shots: int,
                 val_shots: int, seed: int, parent_run_id: str = "", subset: str = "all",
                 train_templates: list[str] = ()) -> str:
    """Few-shot manifests for ``seed``; returns the training manifest hash (a cache key downstream).

    ``subset`` ``base`` keeps the first ceil(n/2) classes (base-to-new; see
    :func:`saft.data.fewshot.split_base_new`); ``train_templates`` replaces the dataset's
    training prompt.
    """
    from saft.data.prepare import prepare_dataset

    logged = {"seed": seed, "dataset": dataset, "root": data_root, "split": split, "shots": shots,
              "val_shots": val_shots, "subset": subset}
    name = f"prepare seed{seed}" + ("" if subset == "all" else f" {subset}")
    with step_context(name, parent_run_id, logged) as tracker:
        result = prepare_dataset(train_root(world_dir, data_root), out_dir, dataset=dataset, split=split or None,
                                 shots=shots, seed=seed, val_shots=val_shots, subset=subset,
                                 train_templates=list(train_templates) or None)
        tracker.set_tags({"saft.manifest_hash": result.manifest_hash})
    return result.manifest_hash


def score_task(data_dir: str, out_dir: str, cfg, parent_run_id: str = "", *, progress: bool = False,
               log=_log) -> dict:
    from saft.steps.score import score_step

    cfg.device = resolve_device(cfg.device)
    with step_context(f"score {cfg.kind} seed{cfg.seed}", parent_run_id, cfg.__dict__) as tracker:
        stats = score_step(cfg, data_dir, out_dir, progress=progress, log=log)
        tracker.log_mask_stats(stats)
        tracker.log_artifact(str(Path(out_dir) / MASK_FILE))
    return stats


def finetune_task(model: str, data_dir: str, mask_dir: str | None, out_dir: str, cfg, *,
                  device: str = "cpu", parent_run_id: str = "", progress: bool = False, log=_log,
                  prompts: str = "train") -> dict:
    from saft.steps.finetune import finetune_step

    mask = str(Path(mask_dir) / MASK_FILE) if mask_dir and cfg.method != "full" else None
    device = resolve_device(device)
    with step_context(f"finetune {cfg.method} seed{cfg.seed}", parent_run_id, cfg.__dict__) as tracker:
        summary = finetune_step(model, cfg, data_dir, out_dir, mask_path=mask, device=device, progress=progress,
                                prompts=prompts, log=log)
        tracker.log_history(json.loads((Path(out_dir) / HISTORY_FILE).read_text()))
        tracker.log_artifact(str(Path(out_dir) / DELTA_FILE))
    return summary


def gather_deltas(delta_dirs: list[str], out_dir: str) -> list[str]:
    """Copy finetune output folders into ``out_dir/<method>-seed<N>/`` (delta, history, record)."""
    import shutil

    names = []
    for run, folder in zip(_runs(delta_dirs), delta_dirs):
        name = f"{run.name}-seed{run.seed}"
        target = Path(out_dir) / name
        target.mkdir(parents=True, exist_ok=True)
        for f in (DELTA_FILE, HISTORY_FILE, FINETUNE_FILE):
            shutil.copyfile(Path(folder) / f, target / f)
        names.append(name)
    return names


def delta_runs(deltas_dir: str) -> list:
    """Method and seed of every delta gathered into ``deltas_dir``, from each finetune.json."""
    folders = sorted(str(p.parent) for p in Path(deltas_dir).glob(f"*/{FINETUNE_FILE}"))
    if not folders:
        raise ValueError(f"{deltas_dir}: no finetune outputs (expected <method>-seed<N>/{FINETUNE_FILE})")
    return sorted(_runs(folders), key=lambda r: (r.name, r.seed))


def _runs(delta_dirs: list[str]) -> list:
    from saft.steps.evaluate import DeltaRun

    runs = []
    for folder in delta_dirs:
        record = json.loads((Path(folder) / FINETUNE_FILE).read_text())
        runs.append(DeltaRun(record["config"]["method"], str(Path(folder) / DELTA_FILE), record["config"]["seed"]))
    return runs


def suite_datasets(world_dir: str, suite: str, data_root: str) -> list[str]:
    return [e.name for e in resolve_suite(world_dir, suite, data_root).entries]


def protocol_task(params_json: str, world_dir: str) -> str:
    """Check the run's protocol and the gate's inputs before anything trains (:mod:`saft.steps.plan`).

    Returns the gate metric (``id_ood`` or ``hm``; ``""`` when registration is off) for the
    register task; raises ``ParamsError`` with the setting to change otherwise.
    """
    from saft.steps.params import params_from_dict
    from saft.steps.plan import check_protocol, training_plan

    params = params_from_dict(json.loads(params_json), "pipeline parameters")
    resolved = resolve_suite(world_dir, params.evaluate.suite, params.evaluate.data_root, params.data.subset)
    return check_protocol(params, resolved, training_plan(params, resolved, params.data.root)) or ""


def base_to_new_trainings(world_dir: str, suite: str, data_root: str) -> list[dict]:
    """The base-to-new protocol's fan-out: one training per dataset of the suite.

    Each item: ``name`` (the dataset group), ``dataset`` (adapter) and ``root`` to prepare
    from with ``subset="base"`` (its training split), and ``entries``, the two suite
    entries (base and new half) that only this dataset's deltas evaluate. Empty for a
    suite of one dataset or none (those train once, on ``data``).
    """
    from saft.steps.params import PipelineParams
    from saft.steps.plan import training_plan

    params = PipelineParams()
    params.data.subset = "base"
    plan = training_plan(params, resolve_suite(world_dir, suite, data_root), "")
    if len(plan) < 2:
        return []
    return [{"name": t.name, "folder": t.folder, "dataset": t.dataset, "root": t.root, "entries": list(t.entries)}
            for t in plan]


def evaluate_task(model: str, world_dir: str, suite: str, data_root: str, dataset: str, deltas_dir: str,
                  out_dir: str, *, alphas: list[float], batch_size: int, device: str = "cpu",
                  parent_run_id: str = "", reference: str = "") -> dict:
    """One suite dataset for the base and every delta (the evaluation fan-out).

    ``reference`` is the effective-robustness reference (``evaluate.reference``); every
    part of one suite must use the same, or collect refuses to merge them.
    """
    from saft.steps.evaluate import EvaluateConfig, evaluate_suite

    resolved = resolve_suite(world_dir, suite, data_root)
    cfg = EvaluateConfig(model=model, deltas=delta_runs(deltas_dir), alphas=list(alphas), batch_size=batch_size,
                         device=resolve_device(device), only=[dataset], reference=reference)
    with step_context(f"evaluate {dataset}", parent_run_id, {"dataset": dataset}) as tracker:
        doc = evaluate_suite(cfg, resolved, out_dir, progress=False, log=_log)
        tracker.log_metrics_document(doc)
    return doc


def collect_task(part_dirs: list[str], deltas_dir: str, out_dir: str, *, learning_rates: dict,
                 parent_run_id: str = "") -> dict:
    from saft.steps.collect import collect_step, results_text

    with step_context("collect", parent_run_id) as tracker:
        summary = collect_step([Path(p) / METRICS_FILE for p in part_dirs], out_dir, deltas=delta_runs(deltas_dir),
                               learning_rates=learning_rates)
        tracker.log_metrics_document(json.loads((Path(out_dir) / METRICS_FILE).read_text()))
        tracker.log_report(out_dir)
    _log(results_text(summary))
    return summary


def register_task(model: str, results_dir: str, deltas_dir: str, data_dirs: list[str], out_dir: str, *,
                  method: str, model_name: str, promote: bool, ood_tolerance: float, id_tolerance: float,
                  baseline: bool = True, parent_run_id: str = "", gate: str = "auto",
                  hm_tolerance: float = 0.01) -> dict:
    """Register the first seed's delta of ``method`` with the suite's metrics over all seeds."""
    from saft.steps.register import RegisterConfig, register_step

    runs = [r for r in delta_runs(deltas_dir) if r.name == method]
    if not runs:
        raise ValueError(f"register: no {method} delta among the finetune outputs")
    candidate = min(runs, key=lambda r: r.seed)
    data_dir = next(d for d in data_dirs if json.loads((Path(d) / "prepare.json").read_text())["seed"] == candidate.seed)
    cfg = RegisterConfig(model_name=model_name, method=method, promote=promote, ood_tolerance=ood_tolerance,
                         id_tolerance=id_tolerance, gate=gate, hm_tolerance=hm_tolerance, baseline=baseline)
    return register_step(cfg, Path(results_dir) / METRICS_FILE, candidate.path, out_dir, base_model=model,
                         data_dir=data_dir, parent_run_id=parent_run_id or None)
