"""Cluster use: compile the pipeline, submit a run, create a recurring (cron) run.

Authentication follows what KFP users expect: a bearer token from ``--token-env``
(default ``KFP_TOKEN``) when set, otherwise the kfp client's own credentials (e.g. the
in-cluster service account or kube config). The token value is never printed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from saft.io import atomic_path
from saft.orchestration.dag import ClusterConfig, build_pipeline, pipeline_arguments
from saft.steps.params import PipelineParams

DEFAULT_PACKAGE = "pipelines/saft_pipeline.yaml"


def compile_pipeline(out: str | Path = DEFAULT_PACKAGE, cfg: ClusterConfig = ClusterConfig()) -> Path:
    from kfp import compiler

    out = Path(out)
    with atomic_path(out) as tmp:
        compiler.Compiler().compile(build_pipeline(cfg), str(tmp.with_suffix(".yaml")))
        tmp.with_suffix(".yaml").replace(tmp)
    return out


def make_client(host: str, token_env: str = "KFP_TOKEN", namespace: str | None = None):
    import kfp

    token = os.environ.get(token_env) or None
    return kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")


def _package(package: str | None, image: str | None) -> tuple[str, tempfile.TemporaryDirectory | None]:
    if package:
        if not Path(package).is_file():
            raise ValueError(f"{package}: no compiled pipeline there; run `saft pipeline compile --out {package}`")
        return package, None
    tmpdir = tempfile.TemporaryDirectory(prefix="saft-pipeline-")
    path = Path(tmpdir.name) / "pipeline.yaml"
    compile_pipeline(path, ClusterConfig(image=image) if image else ClusterConfig())
    return str(path), tmpdir


def submit_run(host: str, params: PipelineParams, *, package: str | None = None, image: str | None = None,
               experiment: str = "saft", run_name: str | None = None, namespace: str | None = None,
               token_env: str = "KFP_TOKEN") -> str:
    """Create one run; returns its run id."""
    path, tmpdir = _package(package, image)
    try:
        client = make_client(host, token_env, namespace)
        result = client.create_run_from_pipeline_package(
            path, arguments=pipeline_arguments(params), run_name=run_name, experiment_name=experiment,
            namespace=namespace)
        return result.run_id
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


def schedule_run(host: str, params: PipelineParams, cron: str, *, name: str = "saft-retrain",
                 package: str | None = None, image: str | None = None, experiment: str = "saft",
                 namespace: str | None = None, token_env: str = "KFP_TOKEN", max_concurrency: int = 1) -> str:
    """Create a recurring run on a KFP cron schedule (6 fields, seconds first); returns its id."""
    fields = cron.split()
    if len(fields) not in (5, 6):
        raise ValueError(f"--cron {cron!r}: expected a cron expression such as '0 0 3 * * *' "
                         "(KFP uses 6 fields: seconds minutes hours day month weekday)")
    if len(fields) == 5:
        cron = "0 " + cron  # a classic 5-field cron: run at second 0
    path, tmpdir = _package(package, image)
    try:
        client = make_client(host, token_env, namespace)
        exp = client.create_experiment(experiment, namespace=namespace)
        job = client.create_recurring_run(
            experiment_id=exp.experiment_id, job_name=name, cron_expression=cron, max_concurrency=max_concurrency,
            pipeline_package_path=path, params=pipeline_arguments(params), enabled=True)
        return job.recurring_run_id
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
