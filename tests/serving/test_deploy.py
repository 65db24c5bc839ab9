"""The KServe path: the rendered InferenceService against the schema, and the deploy step's canary,
promotion and rollback against a local endpoint that answers like the Kubernetes API."""

from __future__ import annotations

import copy
import json
import threading
from http.server import ThreadingHTTPServer

import pytest
from fake_kube import FakeKServe, FakePredictor, serve_fake

from saft.serving.kserve import (
    ManifestError,
    PredictorSettings,
    render,
    service_name,
    validate,
)
from saft.serving.rollout import RolloutConfig

FAST = RolloutConfig(canary_percent=10, ready_timeout_s=5, poll_s=0.01, observe_s=0.05, failure_grace_s=0)


def test_the_manifest_serves_the_version_with_probes_resources_and_gpu() -> None:
    manifest = render("saft-tiny", "saft-tiny", "7", PredictorSettings(image="reg.example/saft:1.2", gpu_count=2))
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    meta = manifest["metadata"]
    assert meta["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"  # canary needs Knative
    assert meta["labels"]["saft.io/model-version"] == "7"
    predictor = manifest["spec"]["predictor"]
    container = predictor["containers"][0]
    assert container["name"] == "kserve-container" and container["image"] == "reg.example/saft:1.2"
    assert container["command"] == ["saft", "serve"] and container["args"][0] == "models:/saft-tiny/7"
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2" == container["resources"]["requests"]["nvidia.com/gpu"]
    assert {"name": "SAFT_SERVE_DEVICE", "value": "cuda"} in container["env"]
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["saft-mlflow", "saft-s3"]
    assert predictor["tolerations"][0]["key"] == "nvidia.com/gpu" and predictor["nodeSelector"]
    cpu = render("saft-tiny", "saft-tiny", "7", PredictorSettings(gpu_count=0))["spec"]["predictor"]
    assert "nodeSelector" not in cpu and "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["requests"]
    assert {"name": "SAFT_SERVE_DEVICE", "value": "cpu"} in cpu["containers"][0]["env"]


def _broken(change) -> dict:
    manifest = copy.deepcopy(render("saft-tiny", "saft-tiny", "1", PredictorSettings()))
    change(manifest)
    return manifest


@pytest.mark.parametrize("change, where", [
    (lambda m: m["spec"]["predictor"].update(canaryTraficPercent=10), "Additional properties"),
    (lambda m: m["spec"]["predictor"].update(canaryTrafficPercent=150), "canaryTrafficPercent"),
    (lambda m: m["metadata"].update(name="Saft_Tiny"), "metadata.name"),
    (lambda m: m["metadata"].update(name="s" + "a" * 50), "metadata.name"),
    (lambda m: m["spec"]["predictor"]["containers"][0].pop("image"), "'image' is a required property"),
    (lambda m: m["spec"]["predictor"]["containers"][0]["resources"]["requests"].update(memory="8 GB"), "memory"),
    (lambda m: m["spec"]["predictor"]["tolerations"][0].update(operator="Maybe"), "operator"),
    (lambda m: m["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"].update(path="ready"), "path"),
    (lambda m: m["spec"]["predictor"]["containers"][0]["ports"][0].update(containerPort=70000), "containerPort"),
    (lambda m: m["spec"]["predictor"].update(minReplicas=3, maxReplicas=2), "MinReplicas"),
    (lambda m: m["spec"]["predictor"]["containers"][0].update(name="server"), "kserve-container"),
    (lambda m: m.update(kind="Deployment"), "kind"),
])
def test_the_schema_refuses_what_the_cluster_would_reject_or_prune(change, where) -> None:
    with pytest.raises(ManifestError) as err:
        validate(_broken(change))
    assert where in str(err.value)


def test_service_names_follow_kserves_format() -> None:
    assert service_name("saft_ViT.B16") == "saft-vit-b16"
    assert service_name("2024-model") == "saft-2024-model"
    long = service_name("m" * 80)
    assert len(long) == 47 and validate(render(long, "m" * 80, "1", PredictorSettings()))


# -- rollout against the fake Kubernetes API -------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite MLflow registry with one registered model of four versions."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("saft-shapes")
    (folder / "model").mkdir()
    for _ in range(4):
        client.create_model_version("saft-shapes", str(folder / "model"))
    return uri, client


@pytest.fixture
def cluster(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry[0])
    monkeypatch.delenv("SAFT_TRACKING", raising=False)
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("KUBE_TOKEN", "tok-123")
    FakePredictor.healthy, FakePredictor.calls = True, []
    predictor = ThreadingHTTPServer(("127.0.0.1", 0), FakePredictor)
    threading.Thread(target=predictor.serve_forever, args=(0.05,), daemon=True).start()
    fake = FakeKServe(f"http://127.0.0.1:{predictor.server_address[1]}")
    api = serve_fake(fake)
    try:
        yield fake, f"http://127.0.0.1:{api.server_address[1]}"
    finally:
        for server in (api, predictor):
            server.shutdown()
            server.server_close()


def _deploy(host, out, version="champion", service="shapes", **kw):
    from saft.steps.deploy import DeployConfig, deploy_step

    cfg = DeployConfig(model_name="saft-shapes", version=version, service=service, kube_host=host, rollout=FAST,
                       predictor=PredictorSettings(namespace="models", gpu_count=1), **kw)
    return deploy_step(cfg, out, log=lambda _: None)


def _tags(registry, version: str) -> dict:
    return registry[1].get_model_version("saft-shapes", version).tags


def _predictor_args(request) -> str:
    return request["body"]["spec"]["predictor"]["containers"][0]["args"][0]


def test_deploy_creates_then_canaries_promotes_and_keeps_a_deployed_version(cluster, registry, tmp_path) -> None:
    fake, host = cluster
    client = registry[1]
    client.set_registered_model_alias("saft-shapes", "champion", "1")
    first = _deploy(host, tmp_path / "d1")
    assert first["status"] == "promoted" and first["version"] == "1" and "first deployment" in first["reason"]
    assert [r["method"] for r in fake.writes()] == ["POST"]
    assert all(r["authorization"] == "Bearer tok-123" for r in fake.requests)
    assert json.loads((tmp_path / "d1" / "inferenceservice.json").read_text())["metadata"]["namespace"] == "models"
    assert _tags(registry, "1")["saft.deploy.status"] == "promoted"

    client.set_registered_model_alias("saft-shapes", "champion", "2")
    fake.requests.clear()
    second = _deploy(host, tmp_path / "d2")
    assert second["status"] == "promoted" and second["previous_version"] == "1", second
    puts = [r for r in fake.writes() if r["method"] == "PUT"]
    assert len(puts) == 2
    assert puts[0]["body"]["spec"]["predictor"]["canaryTrafficPercent"] == 10 and _predictor_args(puts[0]) == "models:/saft-shapes/2"
    assert "canaryTrafficPercent" not in puts[1]["body"]["spec"]["predictor"]  # promoted: all traffic to v2
    assert FakePredictor.calls and FakePredictor.calls[0] == "/v1/models/saft-shapes:predict"  # the smoke test
    status = fake.handle("GET", "/apis/serving.kserve.io/v1beta1/namespaces/models/inferenceservices/shapes", None)[1]
    assert status["status"]["components"]["predictor"]["latestRolledoutRevision"] == "shapes-predictor-00002"
    tags = _tags(registry, "2")
    assert tags["saft.deploy.status"] == "promoted" and tags["saft.deploy.previous_version"] == "1"
    assert tags["saft.deploy.service"] == "models/shapes" and _tags(registry, "1")["saft.deploy.replaced_by"] == "2"
    doc = json.loads((tmp_path / "d2" / "deploy.json").read_text())
    assert doc["status"] == "promoted" and any("canary" in e for e in doc["events"])

    fake.requests.clear()
    again = _deploy(host, tmp_path / "d3")
    assert again["status"] == "unchanged" and fake.writes() == []


def test_a_canary_that_fails_is_rolled_back_and_the_reason_recorded(cluster, registry, tmp_path, capsys) -> None:
    from saft.cli import main

    fake, host = cluster
    client = registry[1]
    client.set_registered_model_alias("saft-shapes", "champion", "2")
    assert _deploy(host, tmp_path / "d0")["status"] == "promoted"

    # v3's pods never become ready: rolled back, through the CLI (exit status 3)
    fake.broken.add("3")
    client.set_registered_model_alias("saft-shapes", "champion", "3")
    fake.requests.clear()
    code = main(["deploy", "--model-name", "saft-shapes", "--service", "shapes", "--namespace", "models",
                 "--kube-host", host, "--out", str(tmp_path / "d3"), "--ready-timeout", "5", "--poll", "0.01",
                 "--observe", "0", "--failure-grace", "0"])
    assert code == 3
    assert "rolled back" in capsys.readouterr().out
    last = fake.writes()[-1]["body"]
    assert last["spec"]["predictor"]["canaryTrafficPercent"] == 0  # all traffic pinned to the old revision
    assert _predictor_args(fake.writes()[-1]) == "models:/saft-shapes/2" and last["metadata"]["labels"]["saft.io/model-version"] == "2"
    assert "RevisionFailed" in last["metadata"]["annotations"]["saft.io/rolled-back"]
    tags = _tags(registry, "3")
    assert tags["saft.deploy.status"] == "rolled back" and "RevisionFailed" in tags["saft.deploy.reason"]
    assert "version 2" in tags["saft.deploy.reason"]

    # v4 becomes ready but answers its smoke prediction with a 500: rolled back too
    FakePredictor.healthy = False
    client.set_registered_model_alias("saft-shapes", "champion", "4")
    result = _deploy(host, tmp_path / "d4")
    assert result["status"] == "rolled back" and "HTTP 500" in result["reason"]
    assert _tags(registry, "4")["saft.deploy.status"] == "rolled back"


def test_a_first_deployment_that_never_gets_ready_is_removed(cluster, registry, tmp_path) -> None:
    fake, host = cluster
    fake.broken.add("1")
    result = _deploy(host, tmp_path / "d", version="1", service="fresh")
    assert result["status"] == "failed" and "deleted the new InferenceService" in result["reason"]
    assert [r["method"] for r in fake.writes()] == ["POST", "DELETE"]


def test_dry_run_and_unknown_versions(cluster, registry, tmp_path) -> None:
    fake, host = cluster
    rendered = _deploy(host, tmp_path / "dry", version="2", dry_run=True)
    assert rendered["status"] == "rendered" and fake.requests == []
    assert (tmp_path / "dry" / "inferenceservice.json").is_file()
    with pytest.raises(ValueError, match="no alias 'staging'"):
        _deploy(host, tmp_path / "x", version="staging")


def _decision(folder, verdict="promoted", version="3"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "register.json").write_text(json.dumps({"verdict": verdict, "version": version}))
    return str(folder)


def test_the_pipelines_deploy_task_rolls_out_the_version_the_gate_promoted(cluster, registry, tmp_path) -> None:
    """The retrain pipeline's deploy task: params.yaml's deploy section -> deploy_step on the promoted version."""
    from saft.serving.kube import InferenceServices
    from saft.orchestration.release_tasks import deploy_task

    fake, host = cluster
    registry[1].set_registered_model_alias("saft-shapes", "champion", "3")
    settings = json.dumps({"enabled": True, "dry_run": False, "namespace": "models", "image": "", "cpu": "4",
                           "memory": "8Gi", "gpu_count": 1, "canary_percent": 25, "ready_timeout_s": 5, "poll_s": 0.01, "observe_s": 0.05})
    isvcs = InferenceServices("models", host=host, token="tok-123")
    doc = deploy_task(_decision(tmp_path / "reg"), str(tmp_path / "out"), model_name="saft-shapes",
                      settings=settings, image="registry.example/saft:1.2", isvcs=isvcs, smoke=None)
    assert doc["status"] == "promoted" and doc["version"] == "3", doc
    manifest = json.loads((tmp_path / "out" / "inferenceservice.json").read_text())
    container = manifest["spec"]["predictor"]["containers"][0]
    assert container["image"] == "registry.example/saft:1.2"  # the pipeline's image when the settings name none
    assert container["resources"]["requests"]["cpu"] == "4"
    assert json.loads((tmp_path / "out" / "deploy.json").read_text())["config"]["rollout"]["canary_percent"] == 25
    assert _tags(registry, "3")["saft.deploy.status"] == "promoted"


def test_the_deploy_task_refuses_what_it_must_not_deploy(cluster, tmp_path) -> None:
    from saft.orchestration.release_tasks import deploy_task

    with pytest.raises(ValueError, match="no promoted version"):
        deploy_task(_decision(tmp_path / "a", verdict="rejected"), str(tmp_path / "o1"), model_name="saft-shapes")
    with pytest.raises(ValueError, match="unknown field.*replicas"):
        deploy_task(_decision(tmp_path / "b"), str(tmp_path / "o2"), model_name="saft-shapes",
                    settings=json.dumps({"replicas": 3}))
    # dry run (params.yaml's default): rendered, nothing applied, no cluster needed
    doc = deploy_task(_decision(tmp_path / "c", version="1"), str(tmp_path / "o3"), model_name="saft-shapes",
                      settings=json.dumps({"dry_run": True}), image="registry.example/saft:1.2")
    assert doc["status"] == "rendered" and (tmp_path / "o3" / "inferenceservice.json").exists()
