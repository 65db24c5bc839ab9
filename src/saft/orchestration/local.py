"""``saft pipeline run --local``: a pipeline function on this machine via ``kfp.local``.

Every task runs as a subprocess in the current environment (``SubprocessRunner(use_venv=
False)``: the project's own packages, no installs). kfp.local ignores the cluster
settings (GPU, secrets, volumes); loop iterations run ``cluster.parallelism`` at a time,
so each task gets that share of the machine's cores (two processes of all-core torch
threads would spend a small machine's time thrashing). Tasks inherit the working folder,
so the default MLflow store (``./mlruns``) is the same for all of them, and the pipeline
run's id (``SAFT_PIPELINE_RUN``), through which they find their parent MLflow run.
Training checkpoints go to ``OUT/checkpoints``. With ``cache``, kfp.local's task cache
(``OUT/kfp/.kfp_cache``) serves unchanged tasks; it keys on the component source and
inputs, not on the library code, so it is off unless asked for. kfp.local's own output
(thousands of lines) goes to ``OUT/kfp.log``; the terminal gets one line per task
(``verbose`` streams it all instead).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable

from saft.steps.params import PipelineParams
from saft.layout import EVAL

LOG_FILE = "kfp.log"


def _limit_threads(parallelism: int) -> None:
    threads = max(1, (os.cpu_count() or 2) // max(1, parallelism))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))


def _this_run(pipeline_root: Path, started: float) -> Path | None:
    """The folder kfp.local made for this run (cached tasks keep their outputs in earlier runs' folders)."""
    runs = [p for p in pipeline_root.iterdir() if p.is_dir() and not p.name.startswith(".")
            and p.stat().st_mtime >= started - 1]
    return max(runs, key=lambda p: p.name) if runs else None


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_local(params: PipelineParams, out_dir: str | Path, *, pipeline: str = "benchmark", tracking: bool = True,
              verbose: bool = False, cache: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run pipeline ``pipeline`` with kfp.local; return the collect task's results (plus decisions, paths)."""
    from kfp import local

    from saft.orchestration.client import build_pipeline, pipeline_arguments
    from saft.orchestration.cluster import ClusterConfig
    from saft.orchestration.tasklog import display_names, strip_ansi, task_log
    from saft.steps.collect import RESULTS_FILE, TABLE_FILE
    from saft.steps.params import write_resolved
    from saft.orchestration.parent_run import PIPELINE_RUN_ENV

    if params.cluster.nodes > 1:
        raise ValueError(f"cluster.nodes is {params.cluster.nodes}: training across nodes needs Kubeflow Trainer on a "
                         "cluster (saft pipeline submit); kfp.local runs every task on this machine, set "
                         "cluster.nodes: 1 (or --set cluster.nodes=1)")
    t0 = time.time()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(params, out)
    cfg = ClusterConfig.from_params(params, kubernetes=False)
    _limit_threads(cfg.parallelism)
    arguments = pipeline_arguments(pipeline, params, tracking=tracking, checkpoint_root=str(out / "checkpoints"))
    root = out / "kfp"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True,
               enable_caching=cache)
    log(f"kfp.local: running the {pipeline} pipeline into {root} (tasks run as subprocesses of this environment"
        f"{'; cached tasks are reused' if cache else ''})")
    if not verbose:
        log(f"full output of every task: {out / LOG_FILE}")
    function = build_pipeline(pipeline, cfg)
    previous = os.environ.get(PIPELINE_RUN_ENV)
    os.environ[PIPELINE_RUN_ENV] = f"local-{uuid.uuid4().hex[:12]}"
    try:
        with task_log(out / LOG_FILE, verbose=verbose, names=display_names(function)) as sink:
            task = function(**arguments)
    except RuntimeError as exc:  # kfp.local's message carries terminal colour codes
        raise RuntimeError(strip_ansi(str(exc))) from None
    finally:
        if previous is None:
            os.environ.pop(PIPELINE_RUN_ENV, None)
        else:
            os.environ[PIPELINE_RUN_ENV] = previous
    results_dir = Path(task.output.path)
    summary = json.loads((results_dir / RESULTS_FILE).read_text())
    summary.update(results_dir=str(results_dir), pipeline=pipeline, cached_tasks=sink.cached if sink else None,
                   seconds=round(time.time() - t0, 1))
    log("")
    log((results_dir / TABLE_FILE).read_text().rstrip())
    run_dir = _this_run(root, t0)
    found = {"selection": "select/chosen/selection.json", "comparison": "compare/comparison/results.json",
             "register": "register/decision/register.json", "deploy": "deploy/deployment/deploy.json"}
    for key, rel in found.items():
        doc = _json(run_dir / rel) if run_dir else None
        if doc is None and key in ("selection", "comparison"):  # served from cache: an earlier run's folder
            doc = next((_json(p) for p in sorted(root.glob(f"*/{rel}"), reverse=True)), None)
        if doc is not None:
            summary[key] = doc
    if "comparison" in summary:
        from saft.steps.collect import results_text

        log("\nwith the baselines (compared, never registered):\n" + results_text(summary["comparison"]))
    if "selection" in summary:
        from saft.steps.select import selection_table

        log("\n" + selection_table(summary["selection"]))
    if "register" in summary:
        log(f"\nregistry: {summary['register'].get('summary', summary['register'].get('verdict'))}")
    elif not tracking:
        log("\nregistry: nothing registered (tracking is off: --no-tracking)")
    elif not params.register.enabled:
        log("\nregistry: nothing registered (register.enabled is false)")
    if "deploy" in summary:
        log(f"deploy: {summary['deploy']['reason']}")
    log(f"\nreport: {results_dir / EVAL.report_html}   results: {results_dir / RESULTS_FILE}")
    log(f"total {summary['seconds']:.0f} s")
    return summary
