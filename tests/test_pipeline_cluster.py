"""The compiled Kubeflow pipeline and the cluster client, without a cluster.

The compiled YAML is compared with the checked-in snapshot (pipelines/saft_pipeline.yaml);
after a reviewed change, regenerate it with `saft pipeline compile`. Submit and schedule
talk to a local HTTP endpoint that answers like the KFP API and records every request.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from saft.cli import main
from saft.orchestration.client import DEFAULT_PACKAGE, compile_pipeline
from saft.orchestration.dag import ClusterConfig, pipeline_arguments
from saft.steps.params import load_params

REPO = Path(__file__).resolve().parents[1]
GPU_TASKS = ("score", "score-2", "finetune", "finetune-2", "finetune-3", "evaluate")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, dict]:
    path = compile_pipeline(tmp_path_factory.mktemp("kfp") / "pipeline.yaml")
    docs = list(yaml.safe_load_all(path.read_text()))
    return path, {"spec": docs[0], "platform": docs[1] if len(docs) > 1 else {}}


def test_compiled_yaml_matches_the_reviewed_snapshot(compiled) -> None:
    path, _ = compiled
    snapshot = REPO / DEFAULT_PACKAGE
    assert snapshot.is_file(), "no snapshot: run `saft pipeline compile` and review the YAML"
    assert path.read_text() == snapshot.read_text(), (
        "the compiled pipeline differs from pipelines/saft_pipeline.yaml; review the change and regenerate "
        "the snapshot with `saft pipeline compile`")


def _executor_of(spec: dict, task: str) -> dict:
    """The container spec of a task (searching every DAG, loops included)."""
    for comp in [spec["root"]] + list(spec["components"].values()):
        tasks = comp.get("dag", {}).get("tasks", {})
        if task in tasks:
            component = spec["components"][tasks[task]["componentRef"]["name"]]
            return spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
    raise KeyError(task)


def _task_spec(spec: dict, task: str) -> dict:
    for comp in [spec["root"]] + list(spec["components"].values()):
        if task in comp.get("dag", {}).get("tasks", {}):
            return comp["dag"]["tasks"][task]
    raise KeyError(task)


def test_gpu_requests_secrets_shm_caching_and_retries_where_they_belong(compiled) -> None:
    _, docs = compiled
    spec, platform = docs["spec"], docs["platform"]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for task in GPU_TASKS:
        container = _executor_of(spec, task)
        resources = container["resources"]
        assert "accelerator" in resources, task
        assert resources["accelerator"].get("resourceCount") or resources["accelerator"].get("count"), task
        assert container["image"] == ClusterConfig().image
        label = next(k for k, v in spec["deploymentSpec"]["executors"].items() if v["container"] is container)
        k8s = executors[label]
        assert k8s["emptyDirMounts"][0]["mountPath"] == "/dev/shm" and k8s["emptyDirMounts"][0]["medium"] == "Memory"
        assert k8s["nodeSelector"] and k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
        secrets = {s["secretName"] for s in k8s["secretAsEnv"]}
        assert secrets == {"saft-s3", "saft-mlflow"}, task
        assert _task_spec(spec, task)["retryPolicy"]["maxRetryCount"] == 2
    for task in ("world", "prepare", "score", "finetune", "evaluate", "collect", "gather-deltas"):
        assert _task_spec(spec, task)["cachingOptions"].get("enableCache") is True, task
    for task in ("start-run", "register", "finish-run"):  # side effects: never served from a cache
        assert not _task_spec(spec, task)["cachingOptions"].get("enableCache"), task
    for task in ("world", "collect"):  # CPU-only tasks do not hold a GPU
        assert "accelerator" not in _executor_of(spec, task).get("resources", {})
    # the data hash flows into the cache key of every task reading the data
    for task in ("score", "finetune"):
        assert "data_hash" in _task_spec(spec, task)["inputs"]["parameters"]


def test_compiled_yaml_holds_no_credentials(compiled) -> None:
    path, _ = compiled
    text = path.read_text()
    for needle in ("AKIA", "aws_secret_access_key=", "password:", "token:"):
        assert needle not in text


def test_params_become_pipeline_arguments() -> None:
    params = load_params(REPO / "params.yaml", ["finetune.steps=7", "finetune.warmup_steps=1", "seeds=[4, 5]", "finetune.lr.saft=0.02"])
    args = pipeline_arguments(params)
    assert args["steps"] == 7 and args["seeds"] == [4, 5] and args["lr_saft"] == 0.02
    assert json.loads(args["params_json"])["finetune"]["steps"] == 7
    with pytest.raises(ValueError, match="saft, random and full"):
        pipeline_arguments(load_params(REPO / "params.yaml", ["finetune.methods=[saft, full]"]))


class _FakeKfp(BaseHTTPRequestHandler):
    """Answers the few KFP v2beta1 calls the client makes; records each request."""

    requests: list[dict] = []

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        entry = {"method": self.command, "path": self.path,
                 "headers": {k.lower(): v for k, v in self.headers.items()},
                 "body": json.loads(raw) if raw else None}
        self.requests.append(entry)
        return entry

    def do_GET(self) -> None:
        self._record()
        if "/experiments" in self.path:
            self._reply({"experiments": [], "total_size": 0})
        else:
            self._reply({"multi_user": False})

    def do_POST(self) -> None:
        entry = self._record()
        if self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({"experiment_id": "exp-1", "display_name": entry["body"]["display_name"]})
        elif self.path.startswith("/apis/v2beta1/runs"):
            self._reply({"run_id": "run-42", "display_name": entry["body"].get("display_name", ""),
                         "experiment_id": "exp-1"})
        elif self.path.startswith("/apis/v2beta1/recurringruns"):
            self._reply({"recurring_run_id": "rr-7", "display_name": entry["body"].get("display_name", "")})
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture
def fake_kfp(monkeypatch):
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    _FakeKfp.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _FakeKfp.requests
    finally:
        server.shutdown()
        server.server_close()


def test_submit_sends_the_compiled_pipeline_with_params_and_token(fake_kfp, tmp_path, monkeypatch, capsys) -> None:
    host, requests = fake_kfp
    monkeypatch.setenv("KFP_TOKEN", "tok-123")
    package = compile_pipeline(tmp_path / "p.yaml")
    code = main(["pipeline", "submit", "--host", host, "--package", str(package), "--params",
                 str(REPO / "params.yaml"), "--set", "finetune.steps=9", "--set", "finetune.warmup_steps=0", "--experiment", "nightly",
                 "--run-name", "retrain-abc"])
    assert code == 0
    assert "run-42" in capsys.readouterr().out
    run = next(r for r in requests if r["method"] == "POST" and r["path"].startswith("/apis/v2beta1/runs"))
    assert run["body"]["display_name"] == "retrain-abc"
    assert run["body"]["experiment_id"] == "exp-1"
    assert run["body"]["runtime_config"]["parameters"]["steps"] == 9
    spec = run["body"]["pipeline_spec"]
    spec = spec.get("pipeline_spec", spec)  # with platform settings the spec is wrapped
    assert spec["pipelineInfo"]["name"] == "saft-robust-finetuning"
    assert requests and all(r["headers"].get("authorization") == "Bearer tok-123" for r in requests)
    created = [r for r in requests if r["method"] == "POST" and "experiments" in r["path"]]
    assert created and created[0]["body"]["display_name"] == "nightly"


def test_schedule_creates_a_cron_recurring_run(fake_kfp, tmp_path, monkeypatch) -> None:
    host, requests = fake_kfp
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    package = compile_pipeline(tmp_path / "p.yaml")
    code = main(["pipeline", "schedule", "--host", host, "--package", str(package), "--cron", "0 3 * * *",
                 "--name", "nightly-saft", "--params", str(REPO / "params.yaml")])
    assert code == 0
    job = next(r for r in requests if r["path"].startswith("/apis/v2beta1/recurringruns"))
    assert job["body"]["display_name"] == "nightly-saft"
    assert job["body"]["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert job["body"]["max_concurrency"] in (1, "1")
    assert job["body"]["runtime_config"]["parameters"]["seeds"] == [1, 2, 3]


def test_bad_cron_and_missing_package_are_clear_errors(fake_kfp, tmp_path, capsys) -> None:
    host, _ = fake_kfp
    assert main(["pipeline", "schedule", "--host", host, "--cron", "every night", "--params",
                 str(REPO / "params.yaml")]) == 2
    assert "cron expression" in capsys.readouterr().err
    assert main(["pipeline", "submit", "--host", host, "--package", str(tmp_path / "none.yaml"), "--params",
                 str(REPO / "params.yaml")]) == 2
    assert "saft pipeline compile" in capsys.readouterr().err
