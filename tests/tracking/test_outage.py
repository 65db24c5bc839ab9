"""A tracking server that goes away mid-run (issue 23): a bounded failure, and no run left RUNNING.

A server of this module's own (SQLite backend, local artifacts) is stopped while a step
logs, then started again on the same port and database.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pytest
from services import Service, free_port
from tracking_support import stop_service

from saft.tracking import TrackingError, end_pipeline_run, start_pipeline_run, step_run


class RestartableServer:
    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.service = None

    def start(self) -> None:
        exe = Path(sys.executable).parent / "mlflow"
        command = [str(exe), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                   "--artifacts-destination", (self.folder / "artifacts").as_uri(), "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1"]
        self.service = Service("mlflow server", command, f"{self.url}/health", log_path=self.folder / "server.log",
                               env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, timeout=180)

    def stop(self) -> None:
        if self.service is not None:
            stop_service(self.service)
            self.service = None

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.url)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (Path(sys.executable).parent / "mlflow").exists():
        pytest.skip("no mlflow console script")
    srv = RestartableServer(tmp_path_factory.mktemp("outage"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def pointed(server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("SAFT_TRACKING_RETRY_S", "3")
    monkeypatch.setenv("SAFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("SAFT_TRACKING", raising=False)
    return server


def test_an_outage_mid_run_fails_within_the_budget_and_the_run_is_closed_when_the_store_returns(pointed):
    from saft.tracking.pending import pending

    experiment = f"outage-{uuid.uuid4().hex[:8]}"
    with pytest.raises(TrackingError) as err:
        with step_run("finetune", None, {"lr": 1}, experiment=experiment) as tracker:
            run_id = tracker.run_id
            tracker.log_metrics({"train.loss": 2.0}, step=1)
            pointed.stop()
            started = time.monotonic()
            tracker.log_metrics({"train.loss": 1.0}, step=2)
    elapsed = time.monotonic() - started
    print(f"the step failed {elapsed:.1f} s after the store went away (SAFT_TRACKING_RETRY_S=3)")
    assert elapsed < 30, elapsed  # a budget of 3 s, not MLflow's ten minutes (the default budget is 60 s)
    message = str(err.value)
    assert "logging metrics" in message and pointed.url in message and "SAFT_TRACKING_RETRY_S" in message
    [entry] = pending(pointed.url)
    assert (entry["run_id"], entry["status"]) == (run_id, "FAILED")

    pointed.start()  # the store is back: the next tracking call closes what the outage left open
    assert pointed.client().get_run(run_id).info.status == "RUNNING"
    parent = start_pipeline_run("next", {}, experiment=experiment)
    run = pointed.client().get_run(run_id)
    assert run.info.status == "FAILED" and "did not answer" in run.data.tags["saft.error"]
    assert run.data.metrics["train.loss"] == 2.0  # what was logged before the outage is kept
    assert pending(pointed.url) == []
    end_pipeline_run(parent)


def test_a_pipeline_end_closes_step_runs_left_open(pointed):
    from saft.tracking.runs import PARENT_TAG

    client = pointed.client()
    parent = start_pipeline_run("p", {}, experiment=f"orphans-{uuid.uuid4().hex[:8]}")
    experiment = client.get_run(parent).info.experiment_id
    orphan = client.create_run(experiment, tags={PARENT_TAG: parent}).info.run_id  # a step whose pod was killed
    with step_run("score", parent) as tracker:
        finished = tracker.run_id
    end_pipeline_run(parent, "FAILED")
    assert client.get_run(orphan).info.status == "FAILED"
    assert "closed when the pipeline ended" in client.get_run(orphan).data.tags["saft.error"]
    assert client.get_run(finished).info.status == "FINISHED" and client.get_run(parent).info.status == "FAILED"


def test_the_retry_budget_maps_onto_mlflow_and_the_user_keeps_the_last_word(monkeypatch):
    from saft.tracking.config import _apply_http_bounds, http_bounds

    for key in ("SAFT_TRACKING_RETRY_S", "SAFT_TRACKING_REQUEST_TIMEOUT_S"):
        monkeypatch.delenv(key, raising=False)
    default = http_bounds()
    retries, factor = int(default["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]), int(default["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    waited = sum(factor * 2 ** (n - 1) for n in range(2, retries + 1))  # urllib3: no wait before the first retry
    assert 30 <= waited <= 70 and default["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
    monkeypatch.setenv("SAFT_TRACKING_RETRY_S", "0")
    assert http_bounds()["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    monkeypatch.setenv("SAFT_TRACKING_RETRY_S", "soon")
    with pytest.raises(ValueError, match="SAFT_TRACKING_RETRY_S='soon'"):
        http_bounds()
    monkeypatch.setenv("SAFT_TRACKING_RETRY_S", "10")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")  # the user's own setting
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    _apply_http_bounds()
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
