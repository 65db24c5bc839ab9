"""Pipeline tasks of evaluation: the suite, the protocol check, the base-to-new fan-out, evaluate, collect.

Kfp-free like :mod:`saft.orchestration.tasks` (whose helpers they use): one function per component.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from saft.orchestration.tasks import FINETUNE_FILE, METRICS_FILE, _log, delta_runs, settings_config
from saft.steps.tracked import step_context


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


def suite_datasets(world_dir: str, suite: str, data_root: str, subset: str = "all") -> list[str]:
    return [e.name for e in resolve_suite(world_dir, suite, data_root, subset).entries]


def protocol_check(world_dir: str, *, suite: str, eval_data_root: str, subset: str, dataset: str, data_root: str,
                   register_enabled: bool, gate: str) -> str:
    """:func:`protocol_task` from the pipeline's own arguments (not params_json, which a run may leave at ``{}``).

    Returns the gate metric ("" when registration is off).
    """
    from saft.steps.params import PipelineParams

    params = PipelineParams()
    params.data.subset, params.data.dataset, params.data.root = subset, dataset, data_root
    params.evaluate.suite, params.evaluate.data_root = suite, eval_data_root
    params.register.enabled, params.register.gate = register_enabled, gate
    return protocol_task(json.dumps(params.validate().to_dict()), world_dir)


def protocol_task(params_json: str, world_dir: str) -> str:
    """Check the run's protocol and the gate's inputs before anything trains (:mod:`saft.orchestration.plan`).

    Returns the gate metric (``id_ood`` or ``hm``; ``""`` when registration is off) for the
    register task; raises ``ParamsError`` with the setting to change otherwise.
    """
    from saft.steps.params import params_from_dict
    from saft.orchestration.plan import check_protocol, training_plan

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
    from saft.orchestration.plan import training_plan

    params = PipelineParams()
    params.data.subset = "base"
    plan = training_plan(params, resolve_suite(world_dir, suite, data_root), "")
    if len(plan) < 2:
        return []
    return [{"name": t.name, "folder": t.folder, "dataset": t.dataset, "root": t.root, "entries": list(t.entries)}
            for t in plan]


def base2new_fanout(world_dir: str, suite: str, eval_data_root: str, *, dataset: str, data_root: str) -> list[dict]:
    """The base2new pipeline's trainings: one per base-to-new group of the suite, as ``saft run`` plans them.

    Each item: ``group`` (the dataset, which evaluate takes as its ``dataset``: both halves;
    not ``name``, which a kfp loop item keeps for itself),
    ``dataset`` and ``root`` to prepare from with ``subset="base"``, and ``version_check``.
    A suite of several datasets trains each on its own suite root (which the run's data
    version, taken of ``data_root``, does not cover: prepared without the check); a suite of
    one group (the world's synthshift-b2n) trains once, on ``dataset`` at ``data_root``
    ("" = the world's pool), checked against the version as in the other pipelines.
    """
    from saft.steps.params import ParamsError

    resolved = resolve_suite(world_dir, suite, eval_data_root, "base")
    groups = resolved.base_to_new_groups()
    if not groups:
        raise ParamsError(f"suite {resolved.name!r} has no base/new entries: the base2new pipeline needs a "
                          "base-to-new suite (base2new, the world's synthshift-b2n, or your own)")
    if len(groups) == 1:
        return [{"group": next(iter(groups)), "dataset": dataset, "root": data_root, "version_check": True}]
    return [{"group": t["name"], "dataset": t["dataset"], "root": t["root"], "version_check": False}
            for t in base_to_new_trainings(world_dir, suite, eval_data_root)]


def entries_of(suite, dataset: str) -> list[str]:
    """The suite entries ``dataset`` names: an entry, or a base-to-new group (its base and new half); [] = all."""
    if not dataset:
        return []
    if any(e.name == dataset for e in suite.entries):
        return [dataset]
    groups = suite.base_to_new_groups()
    if dataset in groups:
        return [e.name for e in groups[dataset]]
    raise ValueError(f"evaluate: suite {suite.name!r} has no entry or base-to-new group {dataset!r} (entries: "
                     f"{', '.join(e.name for e in suite.entries)})")


def evaluate_task(model: str, world_dir: str, suite: str, data_root: str, dataset: str, deltas_dir: str,
                  out_dir: str, *, alphas: list[float], batch_size: int, device: str = "cpu",
                  parent_run_id: str = "", reference: str = "", zeroshot: bool = True,
                  loader: str | dict | None = None, subset: str = "all", template_set: str = "default",
                  allow_train_overlap: bool = False) -> dict:
    """One suite dataset (``dataset``; "" = all) for the base and every delta (the evaluation fan-out).

    ``dataset`` may name a base-to-new group: its base and new halves (one dataset's deltas
    score its own classes only). ``reference`` is the effective-robustness reference
    (``evaluate.reference``); every part of one suite must use the same, or collect
    refuses to merge them. ``loader``: params.yaml's ``loader:`` section as JSON. ``subset``
    picks the world's suite as :func:`resolve_suite`.
    """
    from saft.config import to_mapping
    from saft.loader import LoaderSettings
    from saft.steps.configs import EvaluateConfig
    from saft.steps.evaluate import evaluate_suite
    from saft.orchestration.torchrun import task_processes

    resolved = resolve_suite(world_dir, suite, data_root, subset)
    cfg = EvaluateConfig(model=model, suite=suite, data_root=data_root, deltas=delta_runs(deltas_dir),
                         alphas=list(alphas), batch_size=batch_size, device=device, only=entries_of(resolved, dataset),
                         zeroshot=zeroshot, reference=reference, template_set=template_set,
                         allow_train_overlap=allow_train_overlap,
                         **to_mapping(settings_config(LoaderSettings, loader)))
    processes = task_processes(cfg.device)
    with step_context(f"evaluate {dataset or 'suite'}", parent_run_id, {"dataset": dataset or "all"}) as tracker:
        if processes > 1:  # one process per GPU of the pod: each rank a share of every dataset's batches
            doc = _evaluate_launched(cfg, resolved, out_dir, processes)
        else:
            doc = evaluate_suite(cfg, resolved, out_dir, progress=False, log=_log)
        tracker.log_metrics_document(doc)
    return doc


def _evaluate_launched(cfg, suite, out_dir: str, processes: int) -> dict:
    """``saft evaluate`` as ``processes`` ranks over ``suite`` (handed over as a suite file of resolved roots)."""
    import tempfile

    import yaml

    from saft.eval.suites import suite_document
    from saft.orchestration.torchrun import evaluate_argv, run_launched

    with tempfile.TemporaryDirectory(prefix="saft-suite-") as tmp:
        suite_file = Path(tmp) / f"{suite.name}.yaml"
        suite_file.write_text(yaml.safe_dump(suite_document(suite), sort_keys=False))
        run_launched(evaluate_argv(replace(cfg, suite=str(suite_file), data_root=""), out_dir), processes, out_dir,
                     log=_log)
    return json.loads((Path(out_dir) / METRICS_FILE).read_text())


def rates_of_deltas(deltas_dirs: list[str]) -> dict[str, float | list[float]]:
    """Each method's learning rate, read from the finetune records of the deltas: one rate, or the rates of the
    seeds in seed order when they chose differently on validation."""
    rates: dict[str, dict] = {}
    for folder in deltas_dirs:
        own = Path(folder) / FINETUNE_FILE  # one finetune output rather than a gathered folder
        for record in [own] if own.is_file() else Path(folder).glob(f"*/{FINETUNE_FILE}"):
            cfg = json.loads(record.read_text())["config"]
            rates.setdefault(cfg["method"], {})[cfg["seed"]] = float(cfg["lr"])
    return {m: (next(iter(set(r.values()))) if len(set(r.values())) == 1 else [r[s] for s in sorted(r)])
            for m, r in rates.items()}


def collect_task(part_dirs: list[str], deltas_dir: str | list[str], out_dir: str, *,
                 learning_rates: dict | None = None, parent_run_id: str = "", step: str = "collect") -> dict:
    """Merge evaluation parts (folders holding metrics.json); rates default to the deltas' own."""
    from saft.steps.collect import collect_step, results_text

    dirs = [deltas_dir] if isinstance(deltas_dir, str) else list(deltas_dir)
    runs = [r for d in dirs for r in delta_runs(d)]
    if learning_rates is None:
        learning_rates = rates_of_deltas(dirs)
    with step_context(step, parent_run_id) as tracker:
        summary = collect_step([Path(p) / METRICS_FILE for p in part_dirs], out_dir, deltas=runs,
                               learning_rates=learning_rates)
        tracker.log_metrics_document(json.loads((Path(out_dir) / METRICS_FILE).read_text()))
        tracker.log_report(out_dir)
    _log(results_text(summary))
    return summary
