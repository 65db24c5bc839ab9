"""Fixtures for the tracking tests: a real candidate, and a real MLflow server on moto S3.

* ``candidate``: the tiny embedded model scored, fine-tuned (SAFT, 20 steps) and
  evaluated zero-shot and at alpha 0.5/1 on a three-domain mini suite of the embedded
  world; computed once per session.
* ``mlflow_server``: ``mlflow server`` on 127.0.0.1 with a SQLite backend in a temporary
  folder and artifacts proxied to ``s3://<bucket>/mlflow`` on the moto endpoint; stopped
  by its pid at the end of the session.
* ``tracking_env``: this test process pointed at that server (restored afterwards).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from services import Service, ServiceError, free_port
from tracking_support import (ALPHA, AWS_TEST_ENV, FEW_SHOT, SUITE, TEST_PER_CLASS, Candidate, MlflowServer,
                              stop_service)

@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core machine shared with other workers
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def candidate(tmp_path_factory) -> Candidate:
    from saft.data.prepare import prepare_dataset
    from saft.data.synth import write_domain
    from saft.eval.suites import load_suite
    from saft.steps.configs import FinetuneStepConfig
    from saft.steps.evaluate import DeltaRun, EvaluateConfig, evaluate_suite
    from saft.steps.finetune import finetune_step
    from saft.steps.score import ScoreConfig, score_step
    from saft.world.task import WORLD_SEED, suite_document

    base = tmp_path_factory.mktemp("candidate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFT_CACHE_DIR", str(base / "cache"))  # zero-shot heads stay out of the home folder
        world = base / "world"
        write_domain(world / "textile" / "pool", "textile", FEW_SHOT, seed=WORLD_SEED)
        for domain in ("textile", "sketch", "photo"):
            write_domain(world / domain / "test", domain, TEST_PER_CLASS, seed=WORLD_SEED, start=10_000)
        prepare_dataset(world / "textile" / "pool", base / "data", shots=FEW_SHOT, seed=1, val_shots=0)
        score_step(ScoreConfig(model="tiny", density=0.001, batch_size=16), base / "data", base / "score",
                   progress=False)
        finetune_step(FinetuneStepConfig(model="tiny", method="saft", steps=20, batch_size=16, lr=3e-4, seed=1),
                      base / "data", base / "finetune", mask_path=base / "score" / "mask.safetensors",
                      progress=False)
        entries = [{"name": "textile", "dataset": "imagefolder", "root": str(world / "textile" / "test"), "role": "id"}]
        entries += [{"name": d, "dataset": "imagefolder", "root": str(world / d / "test"), "role": "ood"}
                    for d in ("sketch", "photo")]
        (base / "suite.yaml").write_text(suite_document(SUITE, entries))
        cfg = EvaluateConfig(model="tiny", deltas=[DeltaRun("saft", str(base / "finetune" / "delta.safetensors"), 1)],
                             alphas=[ALPHA, 1.0])
        evaluate_suite(cfg, load_suite(str(base / "suite.yaml"), None), base / "eval", progress=False,
                       log=lambda _: None)
    return Candidate(world, base / "data", base / "score" / "mask.safetensors", base / "score" / "mask_stats.json",
                     base / "finetune" / "delta.safetensors", base / "finetune" / "history.json", base / "eval")


@pytest.fixture(scope="session")
def mlflow_server(moto_endpoint: str, tmp_path_factory) -> Iterator[MlflowServer]:
    import boto3

    exe = Path(sys.executable).parent / "mlflow"
    if not exe.exists():
        pytest.skip(f"no mlflow console script next to {sys.executable}")
    bucket = f"saft-mlflow-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**AWS_TEST_ENV, "MLFLOW_S3_ENDPOINT_URL": moto_endpoint,
           # no background job runner: it forks seven huey consumers that outlive a stopped server
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials")}
    command = [str(exe), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", f"s3://{bucket}/mlflow", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    try:
        service = Service("mlflow server", command, f"http://127.0.0.1:{port}/health", env=env,
                          log_path=folder / "server.log", timeout=180)
    except ServiceError as exc:
        pytest.fail(str(exc))
    try:
        yield MlflowServer(f"http://127.0.0.1:{port}", bucket, moto_endpoint, folder / "server.log")
    finally:
        stop_service(service)


def _point_at(mp: pytest.MonkeyPatch, server: MlflowServer) -> None:
    for key in list(os.environ):
        if key.startswith("AWS_") or key.upper().endswith("_PROXY"):
            mp.delenv(key)
    for key, value in AWS_TEST_ENV.items():
        mp.setenv(key, value)
    mp.setenv("MLFLOW_TRACKING_URI", server.url)
    mp.setenv("MLFLOW_S3_ENDPOINT_URL", server.s3_endpoint)
    mp.setenv("NO_PROXY", "127.0.0.1,localhost")
    mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mp.delenv("SAFT_TRACKING", raising=False)


@pytest.fixture
def tracking_env(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MlflowServer:
    _point_at(monkeypatch, mlflow_server)
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    return mlflow_server


@pytest.fixture
def model_name() -> str:
    """A registered model name of its own for each test (the server lives for the session)."""
    return f"saft-test-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Pipeline:
    parent_run_id: str
    experiment: str
    model_name: str
    register: dict
    out_dir: Path


@pytest.fixture(scope="session")
def pipeline(candidate: Candidate, mlflow_server: MlflowServer, tmp_path_factory) -> Pipeline:
    """One pipeline run logged the way the orchestrator does it, ending in a promoted champion."""
    from saft.steps.register import RegisterConfig, register_step
    from saft.tracking import end_pipeline_run, start_pipeline_run, step_run

    out = tmp_path_factory.mktemp("pipeline")
    experiment = f"saft-test-{uuid.uuid4().hex[:8]}"
    name = f"saft-pipeline-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp:
        _point_at(mp, mlflow_server)
        params = {"model": "tiny", "score": {"density": 0.001}, "finetune": {"steps": 20, "lr": 3e-4},
                  "evaluate": {"suite": SUITE, "alphas": [ALPHA, 1.0]}}
        parent = start_pipeline_run("synthshift-mini", params, tags={"trigger": "test"}, experiment=experiment)
        with step_run("score", parent, params["score"]) as tracker:
            tracker.log_mask_stats(json.loads(candidate.mask_stats.read_text()))
            tracker.log_artifact(candidate.mask, "mask")
        with step_run("finetune", parent, params["finetune"]) as tracker:
            tracker.log_history(json.loads(candidate.history.read_text()))
            tracker.log_artifact(candidate.delta, "delta")
        with step_run("evaluate", parent, params["evaluate"]) as tracker:
            tracker.log_metrics_document(candidate.doc())
            tracker.log_report(candidate.eval_dir)
        cfg = RegisterConfig(model_name=name, alpha=ALPHA, ood_tolerance=0.02, id_tolerance=0.02)
        result = register_step(cfg, candidate.metrics, candidate.delta, out / "register", base_model="tiny",
                               data_dir=candidate.data_dir, parent_run_id=parent)
        end_pipeline_run(parent)
    return Pipeline(parent, experiment, name, result, out / "register")
