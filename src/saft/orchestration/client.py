"""Cluster use: compile a pipeline, submit a run (and wait for it), create a recurring (cron) run.

Authentication follows what KFP users expect: a bearer token from ``--token-env``
(default ``KFP_TOKEN``) when set, otherwise the kfp client's own credentials (e.g. the
in-cluster service account or kube config). The token value is never printed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from saft.io import atomic_path, shorten
from saft.orchestration.cluster import ClusterConfig
from saft.steps.params import PipelineParams

FINISHED_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "ERROR", "CANCELED")


class KfpError(RuntimeError):
    """The KFP API could not be reached or refused a call (one line: what, where, and what to check)."""


@contextlib.contextmanager
def kfp_call(host: str, what: str):
    """Turn the kfp client's transport and API errors (urllib3 retries, ApiException bodies) into one line."""
    try:
        yield
    except (KfpError, ValueError, TimeoutError):
        raise
    except Exception as exc:  # urllib3.MaxRetryError, kfp_server_api ApiException, ...: types of several packages
        status = getattr(exc, "status", None)
        reason = getattr(exc, "reason", None) or exc
        text = shorten(str(reason))
        if status in (401, 403):
            hint = "the token (--token-env) or the namespace (--namespace) is not accepted"
        elif status:
            hint = f"the API answered {status}"
        else:
            hint = "check --host (the KFP API endpoint, e.g. https://kubeflow.example.com/pipeline) and the network"
        raise KfpError(f"{what} at {host} failed: {type(exc).__name__}: {text}; {hint}") from None


def build_pipeline(name: str, cfg: ClusterConfig = ClusterConfig(), repo=None):
    """The pipeline function of ``pipelines/<name>/pipeline.py`` for ``cfg``."""
    from saft.orchestration.repository import load_components, load_pipeline

    return load_pipeline(name, repo).build(cfg, load_components(cfg.image, repo))


def pipeline_arguments(name: str, params: PipelineParams, *, tracking: bool = True, checkpoint_root: str = "",
                       repo=None) -> dict:
    """``params`` as the arguments of pipeline ``name``."""
    from saft.orchestration.repository import load_pipeline

    return load_pipeline(name, repo).arguments(params, tracking=tracking, checkpoint_root=checkpoint_root)


def compile_pipeline(name: str, out: str | Path, cfg: ClusterConfig = ClusterConfig(), repo=None) -> Path:
    """Compile pipeline ``name`` into ``out`` (the reviewed snapshot is ``repository.package_path(name)``)."""
    from kfp import compiler

    out = Path(out)
    with atomic_path(out) as tmp:
        compiler.Compiler().compile(build_pipeline(name, cfg, repo), str(tmp.with_suffix(".yaml")))
        tmp.with_suffix(".yaml").replace(tmp)
    return out


def make_client(host: str, token_env: str = "KFP_TOKEN", namespace: str | None = None):
    import kfp

    import warnings

    token = os.environ.get(token_env) or None
    with warnings.catch_warnings():  # its version notice on every call says nothing about this call
        warnings.filterwarnings("ignore", category=FutureWarning, module="kfp")
        return kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")


def _package(name: str, package: str | None, cfg: ClusterConfig) -> tuple[str, tempfile.TemporaryDirectory | None]:
    if package:
        if not Path(package).is_file():
            raise ValueError(f"{package}: no compiled pipeline there; run `saft pipeline compile --pipeline {name} "
                             f"--image REGISTRY/saft:TAG --out {package}`")
        return package, None
    tmpdir = tempfile.TemporaryDirectory(prefix="saft-pipeline-")
    path = Path(tmpdir.name) / "pipeline.yaml"
    compile_pipeline(name, path, cfg)
    return str(path), tmpdir


def submit_run(host: str, name: str, params: PipelineParams, *, package: str | None = None,
               cfg: ClusterConfig = ClusterConfig(), experiment: str = "saft", run_name: str | None = None,
               namespace: str | None = None, token_env: str = "KFP_TOKEN") -> str:
    """Create one run of pipeline ``name``; returns its run id."""
    path, tmpdir = _package(name, package, cfg)
    try:
        with kfp_call(host, f"submitting the {name} pipeline"):
            client = make_client(host, token_env, namespace)
            result = client.create_run_from_pipeline_package(
                path, arguments=pipeline_arguments(name, params), run_name=run_name, experiment_name=experiment,
                namespace=namespace)
        return result.run_id
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


def wait_for_run(host: str, run_id: str, timeout_s: float, *, token_env: str = "KFP_TOKEN",
                 namespace: str | None = None, poll_s: float = 30.0) -> str:
    """Wait (at most ``timeout_s``) for the run to finish; returns its final state (e.g. SUCCEEDED)."""
    try:
        with kfp_call(host, f"waiting for run {run_id}"):
            client = make_client(host, token_env, namespace)
            run = client.wait_for_run_completion(run_id, timeout=timeout_s, sleep_duration=poll_s)
    except TimeoutError:
        raise TimeoutError(f"run {run_id} did not finish within {timeout_s:.0f} s; it keeps running on the cluster "
                           f"(follow it in the KFP UI)") from None
    return str(run.state).upper()


def schedule_run(host: str, name: str, params: PipelineParams, cron: str, *, job_name: str = "saft-retrain",
                 package: str | None = None, cfg: ClusterConfig = ClusterConfig(), experiment: str = "saft",
                 namespace: str | None = None, token_env: str = "KFP_TOKEN", max_concurrency: int = 1) -> str:
    """Create a recurring run of pipeline ``name`` on a KFP cron schedule (6 fields, seconds first)."""
    fields = cron.split()
    if len(fields) not in (5, 6):
        raise ValueError(f"--cron {cron!r}: expected a cron expression such as '0 0 3 * * *' "
                         "(KFP uses 6 fields: seconds minutes hours day month weekday)")
    if len(fields) == 5:
        cron = "0 " + cron  # a classic 5-field cron: run at second 0
    path, tmpdir = _package(name, package, cfg)
    try:
        with kfp_call(host, f"scheduling the {name} pipeline"):
            client = make_client(host, token_env, namespace)
            exp = client.create_experiment(experiment, namespace=namespace)
            job = client.create_recurring_run(
                experiment_id=exp.experiment_id, job_name=job_name, cron_expression=cron,
                max_concurrency=max_concurrency, pipeline_package_path=path, params=pipeline_arguments(name, params),
                enabled=True)
        return job.recurring_run_id
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
