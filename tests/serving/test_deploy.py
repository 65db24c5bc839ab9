"""The KServe path: the rendered InferenceService, the Kubernetes API client, and the deploy step's
canary, promotion and rollback against a local endpoint that answers like the Kubernetes API with
KServe installed (tests/serving/fake_kube.py: strict field validation, dry runs, finalizers,
controller lag, KServe's webhook, Knative and Standard modes)."""

from __future__ import annotations

import copy
import json
from http.server import ThreadingHTTPServer

import pytest
from fake_apiserver import api  # noqa: F401  (a fixture)
from fake_kube import FakeKServe, FakePredictor, FakeTrainer

from saft.serving.kserve import PredictorSettings, mode_of, normalize_mode, render, service_name
from saft.serving.kube import InferenceServices, KubeError
from saft.serving.rollout import RolloutConfig, check_mode

FAST = RolloutConfig(canary_percent=10, ready_timeout_s=5, poll_s=0.01, observe_s=0.05, failure_grace_s=0)
ISVC = "/apis/serving.kserve.io/v1beta1/namespaces/models/inferenceservices"



@pytest.fixture(autouse=True)
def _image(monkeypatch):
    """The project image a user configures once ($SAFT_IMAGE); nothing is published as a default."""
    monkeypatch.setenv("SAFT_IMAGE", "registry.example/saft:test")

def test_the_manifest_serves_the_version_under_the_service_name_with_probes_resources_and_gpu() -> None:
    manifest = render("saft-tiny", "saft_Tiny", "7", PredictorSettings(image="reg.example/saft:1.2", gpu_count=2))
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    meta = manifest["metadata"]
    assert meta["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"  # KServe >= 0.16's name
    assert meta["annotations"]["serving.kserve.io/enable-tag-routing"] == "true"
    assert meta["labels"]["saft.io/model-version"] == "7"
    predictor = manifest["spec"]["predictor"]
    container = predictor["containers"][0]
    assert container["name"] == "kserve-container" and container["image"] == "reg.example/saft:1.2"
    assert container["command"] == ["saft", "serve"] and container["args"][0] == "models:/saft_Tiny/7"
    # served under the InferenceService's name: /v1/models/saft-tiny:predict is the URL a KServe user calls
    assert container["args"][container["args"].index("--name") + 1] == "saft-tiny"
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2" == container["resources"]["requests"]["nvidia.com/gpu"]
    assert {"name": "SAFT_SERVE_DEVICE", "value": "cuda"} in container["env"]
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["saft-mlflow", "saft-s3"]
    assert predictor["tolerations"][0]["key"] == "nvidia.com/gpu" and predictor["nodeSelector"]
    cpu = render("saft-tiny", "saft-tiny", "7", PredictorSettings(gpu_count=0, deployment_mode="Standard"))
    assert cpu["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    assert "serving.kserve.io/enable-tag-routing" not in cpu["metadata"]["annotations"]  # no revisions to tag
    assert "nodeSelector" not in cpu["spec"]["predictor"]
    assert {"name": "SAFT_SERVE_DEVICE", "value": "cpu"} in cpu["spec"]["predictor"]["containers"][0]["env"]


def test_mode_names_and_what_each_mode_can_do() -> None:
    assert normalize_mode("Serverless") == "Knative" and normalize_mode("RawDeployment") == "Standard"
    with pytest.raises(ValueError, match="Knative and Standard"):
        normalize_mode("ModelMesh")
    assert mode_of({"metadata": {"annotations": {"serving.kserve.io/deploymentMode": "Serverless"}}}) == "Knative"
    assert mode_of({"metadata": {}, "status": {"deploymentMode": "Standard"}}) == "Standard"
    assert mode_of({"metadata": {}}) == ""
    with pytest.raises(ValueError, match="canary .* needs KServe's Knative deployment mode.*--canary-percent 0"):
        check_mode("Standard", 10)
    check_mode("Standard", 0)
    check_mode("Knative", 10)
    with pytest.raises(ValueError, match="InferenceService name 'Saft_Tiny'.*--service"):
        render("Saft_Tiny", "saft-tiny", "1", PredictorSettings())
    with pytest.raises(ValueError, match="at most 47"):
        render("s" * 48, "saft-tiny", "1", PredictorSettings())


def test_service_names_follow_kserves_format() -> None:
    assert service_name("saft_ViT.B16") == "saft-vit-b16"
    assert service_name("2024-model") == "saft-2024-model"
    long = service_name("m" * 80)
    assert len(long) == 47 and render(long, "m" * 80, "1", PredictorSettings())


# -- the API server's semantics, through the client -------------------------------------------------


def test_unknown_fields_are_refused_under_strict_validation_and_dropped_with_a_warning_otherwise(api) -> None:
    fake = FakeKServe("http://unused")
    isvcs = InferenceServices("models", host=api(fake))
    manifest = render("shapes", "saft-shapes", "1", PredictorSettings(namespace="models"))
    typo = copy.deepcopy(manifest)
    typo["spec"]["predictor"]["canaryTraficPercent"] = 10
    typo["spec"]["predictor"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(KubeError) as err:
        isvcs.create(typo)
    assert err.value.status == 400 and "strict decoding error" in str(err.value)
    assert 'unknown field "spec.predictor.canaryTraficPercent"' in str(err.value)
    assert 'unknown field "spec.predictor.containers[0].readinesProbe"' in str(err.value)
    assert fake.objects == {} and fake.requests[-1]["query"]["fieldValidation"] == "Strict"
    # what a client without strict validation gets: the misspelt field silently gone, one warning header each
    status, stored, warnings = fake.handle("POST", ISVC, typo, {})
    assert status == 201 and "canaryTraficPercent" not in stored["spec"]["predictor"]
    assert sorted(warnings) == ['unknown field "spec.predictor.canaryTraficPercent"',
                                'unknown field "spec.predictor.containers[0].readinesProbe"']
    assert fake.handle("DELETE", f"{ISVC}/shapes", None, {})[0] == 200


def test_warnings_of_the_api_server_reach_the_client(api, monkeypatch) -> None:
    fake = FakeKServe("http://unused")
    monkeypatch.setattr(InferenceServices, "_write_options", staticmethod(lambda dry: {"field_validation": "Warn"}))
    isvcs = InferenceServices("models", host=api(fake))
    typo = render("shapes", "saft-shapes", "1", PredictorSettings(namespace="models"))
    typo["spec"]["predictor"]["scaleMetrc"] = "rps"
    isvcs.create(typo)
    assert isvcs.warnings == ['unknown field "spec.predictor.scaleMetrc"']


def test_replace_needs_the_resource_version_and_a_conflict_is_retried_from_a_fresh_read(api) -> None:
    fake = FakeKServe("http://unused")
    isvcs = InferenceServices("models", host=api(fake))
    created = isvcs.create(render("shapes", "saft-shapes", "1", PredictorSettings(namespace="models")))
    blind = copy.deepcopy(created)
    del blind["metadata"]["resourceVersion"]
    with pytest.raises(KubeError) as err:
        isvcs.replace(blind)
    assert err.value.status == 422
    assert "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update" in str(err.value)
    stale = copy.deepcopy(created)
    fake.handle("PUT", f"{ISVC}/shapes", {**copy.deepcopy(created), "metadata": {**created["metadata"],
                                                                                  "labels": {"x": "y"}}}, {})
    with pytest.raises(KubeError) as err:
        isvcs.replace(stale)
    assert err.value.status == 409 and err.value.reason == "Conflict"

    calls = []

    def change(obj: dict) -> None:  # another writer changes the object between our read and our write, once
        calls.append(obj["metadata"]["resourceVersion"])
        if len(calls) == 1:
            current = fake.handle("GET", f"{ISVC}/shapes", None, {})[1]
            current["metadata"]["annotations"]["someone"] = "else"
            assert fake.handle("PUT", f"{ISVC}/shapes", current, {})[0] == 200
        obj["spec"]["predictor"].update(minReplicas=2, maxReplicas=3)

    updated = isvcs.update("shapes", change)
    assert len(calls) == 2 and calls[0] != calls[1]  # the second attempt read the other writer's version
    assert updated["spec"]["predictor"]["minReplicas"] == 2 and updated["metadata"]["annotations"]["someone"] == "else"
    assert updated["metadata"]["generation"] == 2  # spec changes move the generation, metadata changes do not


def test_a_deleted_service_lingers_while_its_finalizer_runs_and_blocks_a_create(api) -> None:
    fake = FakeKServe("http://unused", finalize_reads=3)
    isvcs = InferenceServices("models", host=api(fake))
    manifest = render("shapes", "saft-shapes", "1", PredictorSettings(namespace="models"))
    assert isvcs.create(manifest)["metadata"]["finalizers"] == ["inferenceservice.finalizers"]
    held = isvcs.delete("shapes")
    assert held is not None and held["metadata"]["deletionTimestamp"]
    with pytest.raises(KubeError) as err:
        isvcs.create(manifest)
    assert err.value.status == 409 and err.value.terminating
    assert "object is being deleted: inferenceservices.serving.kserve.io \"shapes\" already exists" in str(err.value)
    lines: list[str] = []
    created = isvcs.create_when_free(manifest, 5, poll_s=0, log=lines.append)
    assert created["metadata"]["uid"] != held["metadata"]["uid"] and lines  # it waited, then created a new object
    with pytest.raises(KubeError) as err:  # a live object of that name: an ordinary 409, not waited for
        isvcs.create_when_free(manifest, 5, poll_s=0)
    assert err.value.status == 409 and not err.value.terminating


def test_a_dry_run_is_validated_but_stores_nothing(api) -> None:
    fake = FakeKServe("http://unused")
    isvcs = InferenceServices("models", host=api(fake))
    manifest = render("shapes", "saft-shapes", "1", PredictorSettings(namespace="models"))
    answered = isvcs.create(manifest, dry_run=True)
    assert answered["metadata"]["generation"] == 1 and fake.objects == {}
    assert fake.requests[-1]["query"] == {"dryRun": "All", "fieldValidation": "Strict"}
    bad = render("shapes", "saft-shapes", "1", PredictorSettings(namespace="models", min_replicas=3, max_replicas=2))
    with pytest.raises(KubeError) as err:  # KServe's webhook runs on a dry run too
        isvcs.create(bad, dry_run=True)
    assert err.value.status == 403 and "denied the request: 'MinReplicas' cannot be greater than MaxReplicas" \
        in str(err.value)


# -- rollout against the fake cluster ---------------------------------------------------------------


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


def _cluster(monkeypatch, registry, api, **fake_options):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry[0])
    monkeypatch.delenv("SAFT_TRACKING", raising=False)
    monkeypatch.setenv("KUBE_TOKEN", "tok-123")
    FakePredictor.healthy, FakePredictor.calls, FakePredictor.model_version = True, [], None
    fake = FakeKServe(api(FakePredictor), **fake_options)
    return fake, api(fake)


@pytest.fixture
def cluster(registry, monkeypatch, api):
    """Knative mode; KServe reconciles each write two reads late, its child's generation counter runs ahead."""
    return _cluster(monkeypatch, registry, api, lag=2, child_generation=5)


@pytest.fixture
def standard_cluster(registry, monkeypatch, api):
    return _cluster(monkeypatch, registry, api, lag=1, ready_after=2)


def _deploy(host, out, version="champion", service="shapes", mode="Knative", rollout=FAST, **kw):
    from saft.steps.deploy import DeployConfig, deploy_step

    settings = {"namespace": "models", "gpu_count": 1, "deployment_mode": mode, **kw.pop("predictor", {})}
    cfg = DeployConfig(model_name="saft-shapes", version=version, service=service, kube_host=host, rollout=rollout,
                       predictor=PredictorSettings(**settings), **kw)
    return deploy_step(cfg, out, log=lambda _: None)


def _tags(registry, version: str) -> dict:
    return registry[1].get_model_version("saft-shapes", version).tags


def _predictor_args(request) -> list[str]:
    return request["body"]["spec"]["predictor"]["containers"][0]["args"]


def test_deploy_creates_then_canaries_promotes_and_keeps_a_deployed_version(cluster, registry, tmp_path) -> None:
    fake, host = cluster
    client = registry[1]
    client.set_registered_model_alias("saft-shapes", "champion", "1")
    first = _deploy(host, tmp_path / "d1")
    assert first["status"] == "promoted" and first["version"] == "1" and "first deployment" in first["reason"]
    assert first["mode"] == "Knative" and _tags(registry, "1")["saft.deploy.mode"] == "Knative"
    assert [r["method"] for r in fake.writes()] == ["POST"]
    assert all(r["authorization"] == "Bearer tok-123" for r in fake.requests)
    assert all(r["query"].get("fieldValidation") == "Strict" for r in fake.writes())
    # KServe reconciled the create two reads late: the rollout waited for the revision to exist
    assert any("has not created the revision of models:/saft-shapes/" in e for e in first["events"])
    assert json.loads((tmp_path / "d1" / "inferenceservice.json").read_text())["metadata"]["namespace"] == "models"
    assert _tags(registry, "1")["saft.deploy.status"] == "promoted"

    client.set_registered_model_alias("saft-shapes", "champion", "2")
    fake.requests.clear()
    FakePredictor.model_version = "2"  # the tagged URL answers from the new revision only
    second = _deploy(host, tmp_path / "d2")
    assert second["status"] == "promoted" and second["previous_version"] == "1", second
    puts = [r for r in fake.writes() if r["method"] == "PUT"]
    assert len(puts) == 2
    assert puts[0]["body"]["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert _predictor_args(puts[0])[0] == "models:/saft-shapes/2"
    assert "canaryTrafficPercent" not in puts[1]["body"]["spec"]["predictor"]  # promoted: all traffic to v2
    # the controller lagged behind the canary update: until it created the revision, the status was v1's
    assert any("has not created the revision of models:/saft-shapes/" in e for e in second["events"])
    assert FakePredictor.calls and FakePredictor.calls[0] == "/v1/models/shapes:predict"  # the service's name
    status = fake.handle("GET", f"{ISVC}/shapes", None, {})[1]
    assert status["status"]["components"]["predictor"]["latestRolledoutRevision"] == "shapes-predictor-00002"
    assert status["status"]["observedGeneration"] != status["metadata"]["generation"]  # KServe copies the ksvc's
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
    args = ["deploy", "--model-name", "saft-shapes", "--service", "shapes", "--namespace", "models",
            "--kube-host", host, "--out", str(tmp_path / "d3"), "--ready-timeout", "5", "--poll", "0.01",
            "--observe", "0", "--failure-grace", "0"]
    with pytest.MonkeyPatch.context() as unset:  # no image given, none configured: refused before any write
        unset.delenv("SAFT_IMAGE")
        writes = len(fake.writes())
        assert main(args) == 2 and "no project image: pass --image" in capsys.readouterr().err
        assert len(fake.writes()) == writes
    code = main(args)
    assert code == 3
    assert "rolled back" in capsys.readouterr().out
    last = fake.writes()[-1]["body"]
    assert last["spec"]["predictor"]["canaryTrafficPercent"] == 0  # all traffic pinned to the old revision
    assert _predictor_args(fake.writes()[-1])[0] == "models:/saft-shapes/2"
    assert last["metadata"]["labels"]["saft.io/model-version"] == "2"
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

    # a canary answered by the old version (the tagged route not on the new revision): rolled back
    FakePredictor.healthy, FakePredictor.model_version = True, "2"
    result = _deploy(host, tmp_path / "d5", version="4")
    assert result["status"] == "rolled back" and "answered by version 2, not 4" in result["reason"]


def test_a_failed_first_deployment_is_removed_and_the_next_waits_for_its_finalizer(cluster, registry,
                                                                                   tmp_path) -> None:
    fake, host = cluster
    fake.broken.add("1")
    result = _deploy(host, tmp_path / "d", version="1", service="fresh")
    assert result["status"] == "failed" and "deleted the new InferenceService" in result["reason"]
    assert [r["method"] for r in fake.writes()] == ["POST", "DELETE"]
    assert fake.objects[("models", "fresh")]["metadata"]["deletionTimestamp"]  # its finalizer still runs

    fake.broken.clear()
    fake.requests.clear()
    again = _deploy(host, tmp_path / "d2", version="1", service="fresh")
    assert again["status"] == "promoted", again
    assert any("is being deleted" in e for e in again["events"])
    assert [r["method"] for r in fake.writes()] == ["POST"]  # no update of the terminating object


def test_a_service_created_in_another_mode_is_refused_and_a_legacy_name_updated_as_recorded(
        cluster, registry, tmp_path) -> None:
    fake, host = cluster
    isvcs = InferenceServices("models", host=host)
    legacy = render("old", "saft-shapes", "1", PredictorSettings(namespace="models"))
    legacy["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] = "Serverless"  # made before KServe 0.16
    isvcs.create(legacy)
    for _ in range(4):
        isvcs.get("old")  # KServe reconciles it: status.deploymentMode = Knative
    result = _deploy(host, tmp_path / "a", version="2", service="old")
    assert result["status"] == "promoted", result
    put = next(r for r in fake.writes() if r["method"] == "PUT")
    assert put["body"]["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"

    raw = render("raw", "saft-shapes", "1", PredictorSettings(namespace="models", deployment_mode="Standard"))
    isvcs.create(raw)
    isvcs.get("raw"), isvcs.get("raw"), isvcs.get("raw")
    fake.requests.clear()
    with pytest.raises(ValueError, match="runs in KServe's Standard mode .* --deployment-mode Standard"):
        _deploy(host, tmp_path / "b", version="2", service="raw")
    assert fake.writes() == []
    # what KServe's webhook does with such an update, had it been sent
    obj = fake.handle("GET", f"{ISVC}/raw", None, {})[1]
    obj["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] = "Knative"
    code, doc, _ = fake.handle("PUT", f"{ISVC}/raw", obj, {})
    assert code == 403 and "deploymentMode cannot be changed from 'Standard' to 'Knative'" in doc["message"]


def test_standard_mode_replaces_in_place_and_waits_for_the_deployment_not_kserves_stale_ready(
        standard_cluster, registry, tmp_path) -> None:
    fake, host = standard_cluster
    in_place = RolloutConfig(canary_percent=0, ready_timeout_s=5, poll_s=0.01, observe_s=0, failure_grace_s=0)
    with pytest.raises(ValueError, match="needs KServe's Knative deployment mode"):
        _deploy(host, tmp_path / "x", version="1", mode="Standard")
    assert fake.requests == []  # refused before the cluster was asked

    first = _deploy(host, tmp_path / "a", version="1", mode="Standard", rollout=in_place)
    assert first["status"] == "promoted" and first["mode"] == "Standard", (first["reason"], first["events"])
    second = _deploy(host, tmp_path / "b", version="2", mode="Standard", rollout=in_place)
    assert second["status"] == "promoted" and "serves all traffic" in second["reason"], second
    put = next(r for r in fake.writes() if r["method"] == "PUT")
    assert "canaryTrafficPercent" not in put["body"]["spec"]["predictor"]
    # right after the update KServe still said ready (the Deployment's previous rollout); the rollout waited
    assert any("the Deployment controller has not seen shapes-predictor's new pod template" in e
               for e in second["events"]), second["events"]
    assert any("1 of 1 replicas updated, 1 available, 1 old still running" in e for e in second["events"])
    assert FakePredictor.calls[-1] == "/v1/models/shapes:predict"

    fake.broken.add("3")
    fake.requests.clear()
    third = _deploy(host, tmp_path / "c", version="3", mode="Standard", rollout=in_place)
    assert third["status"] == "rolled back" and "ProgressDeadlineExceeded" in third["reason"], third
    restored = fake.writes()[-1]["body"]["spec"]["predictor"]
    assert restored["containers"][0]["args"][0] == "models:/saft-shapes/2" and "canaryTrafficPercent" not in restored


def test_dry_run_asks_the_api_server_when_it_can_and_says_when_it_could_not(cluster, registry, api,
                                                                          tmp_path) -> None:
    fake, host = cluster
    rendered = _deploy(host, tmp_path / "dry", version="2", dry_run=True)
    assert rendered["status"] == "rendered" and rendered["validated"] == "api-server", rendered
    assert "the creation" in rendered["reason"] and fake.objects == {}
    assert [(r["method"], r["query"].get("dryRun")) for r in fake.writes()] == [("POST", "All")]
    assert (tmp_path / "dry" / "inferenceservice.json").is_file()

    assert _deploy(host, tmp_path / "live", version="1")["status"] == "promoted"
    fake.requests.clear()
    update = _deploy(host, tmp_path / "dry2", version="2", dry_run=True)
    assert update["validated"] == "api-server" and "the canary update" in update["reason"]
    (put,) = fake.writes()
    assert put["method"] == "PUT" and put["query"]["dryRun"] == "All"
    assert fake.objects[("models", "shapes")]["metadata"]["labels"]["saft.io/model-version"] == "1"  # untouched

    with pytest.raises(ValueError, match="cluster refused .*MinReplicas"):  # KServe's webhook, through the dry run
        _deploy(host, tmp_path / "bad", version="2", service="other", dry_run=True,
                predictor={"min_replicas": 3, "max_replicas": 2})

    closed = ThreadingHTTPServer(("127.0.0.1", 0), FakePredictor)
    port = closed.server_address[1]
    closed.server_close()
    offline = _deploy(f"http://127.0.0.1:{port}", tmp_path / "off", version="2", dry_run=True)
    assert offline["validated"] == "none" and "cannot reach the Kubernetes API" in offline["reason"]

    missing = _deploy(api(FakeTrainer()), tmp_path / "nok", version="2", dry_run=True)  # no KServe resource there
    assert missing["validated"] == "none" and "KServe's InferenceService API is not installed" in missing["reason"]

    with pytest.raises(ValueError, match="no alias 'staging'"):
        _deploy(host, tmp_path / "x", version="staging")


def _decision(folder, verdict="promoted", version="3"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "register.json").write_text(json.dumps({"verdict": verdict, "version": version}))
    return str(folder)


def test_the_pipelines_deploy_task_rolls_out_the_version_the_gate_promoted(cluster, registry, tmp_path) -> None:
    """The retrain pipeline's deploy task: params.yaml's deploy section -> deploy_step on the promoted version."""
    from saft.orchestration.release_tasks import deploy_task

    fake, host = cluster
    registry[1].set_registered_model_alias("saft-shapes", "champion", "3")
    settings = json.dumps({"enabled": True, "dry_run": False, "namespace": "models", "deployment_mode": "Knative",
                           "image": "", "cpu": "4", "memory": "8Gi", "gpu_count": 1, "canary_percent": 25,
                           "ready_timeout_s": 5, "poll_s": 0.01, "observe_s": 0.05})
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


def test_the_deploy_task_refuses_what_it_must_not_deploy(cluster, tmp_path, monkeypatch) -> None:
    from saft.orchestration.release_tasks import deploy_task

    with pytest.raises(ValueError, match="no promoted version"):
        deploy_task(_decision(tmp_path / "a", verdict="rejected"), str(tmp_path / "o1"), model_name="saft-shapes")
    with pytest.raises(ValueError, match=r"unknown key replicas \(did you mean min_replicas\?\)"):
        deploy_task(_decision(tmp_path / "b"), str(tmp_path / "o2"), model_name="saft-shapes",
                    settings=json.dumps({"replicas": 3}))
    # dry run (params.yaml's default) with no cluster configured: rendered, nothing applied, and said so
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    doc = deploy_task(_decision(tmp_path / "c", version="1"), str(tmp_path / "o3"), model_name="saft-shapes",
                      settings=json.dumps({"dry_run": True}), image="registry.example/saft:1.2")
    assert doc["status"] == "rendered" and doc["validated"] == "none" and "kube-config" in doc["reason"]
    assert (tmp_path / "o3" / "inferenceservice.json").exists()
