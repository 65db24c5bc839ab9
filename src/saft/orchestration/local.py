"""``saft pipeline run --local``: the Kubeflow pipeline function on this machine via ``kfp.local``.

Every task runs as a subprocess in the current environment (``SubprocessRunner(use_venv=
False)``: the project's own packages, no installs). kfp.local ignores the cluster
settings (GPU, secrets, volumes) and runs up to two loop iterations at a time, so each
task gets half of the machine's cores; with two processes of all-core torch threads a
small machine would spend its time thrashing. Tasks inherit the working folder, so the
default MLflow store (``./mlruns``) is the same for all of them. kfp.local's own output
(thousands of lines) goes to ``OUT/kfp.log``; the terminal gets one line per task
(``verbose`` streams it all instead).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from saft.steps.params import PipelineParams

LOCAL_PARALLELISM = 2  # kfp.local's cap on concurrent loop iterations
LOG_FILE = "kfp.log"


def _limit_threads() -> None:
    threads = max(1, (os.cpu_count() or 2) // LOCAL_PARALLELISM)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))


def run_local(params: PipelineParams, out_dir: str | Path, *, tracking: bool = True, verbose: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Run the pipeline with kfp.local; return the collect task's results (plus where they are)."""
    from kfp import local

    from saft.orchestration.dag import ClusterConfig, build_pipeline, pipeline_arguments
    from saft.orchestration.tasklog import display_names, task_log
    from saft.steps.collect import RESULTS_FILE, TABLE_FILE
    from saft.steps.params import write_resolved

    t0 = time.perf_counter()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(params, out)
    _limit_threads()
    arguments = pipeline_arguments(params, tracking=tracking)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "kfp"), raise_on_error=True)
    log(f"kfp.local: running the pipeline into {out / 'kfp'} (tasks run as subprocesses of this environment)")
    if not verbose:
        log(f"full output of every task: {out / LOG_FILE}")
    pipeline = build_pipeline(ClusterConfig(kubernetes=False))
    with task_log(out / LOG_FILE, verbose=verbose, names=display_names(pipeline)):
        task = pipeline(**arguments)
    results_dir = Path(task.output.path)

    summary = json.loads((results_dir / RESULTS_FILE).read_text())
    summary["results_dir"] = str(results_dir)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    log("")
    log((results_dir / TABLE_FILE).read_text().rstrip())
    decision = results_dir.parent.parent / "register" / "decision" / "register.json"
    if decision.is_file():
        summary["register"] = json.loads(decision.read_text())
        log(f"\nregistry: {summary['register'].get('summary', summary['register'].get('verdict'))}")
    log(f"\nreport: {results_dir / 'report.html'}   results: {results_dir / RESULTS_FILE}")
    log(f"total {summary['seconds']:.0f} s")
    return summary
