"""saft.orchestration.trainjob against a local endpoint answering like the Kubernetes API for TrainJobs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_kube import FakeTrainer, serve_fake

from saft.orchestration.trainjob import (
    TrainJobError,
    TrainJobSpec,
    job_name,
    launch_trainjob,
    render_trainjob,
)


@pytest.fixture
def api():
    servers = []

    def start(fake: FakeTrainer) -> str:
        server = serve_fake(fake)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


def _argv(mount: Path) -> list[str]:
    return ["finetune", "--model", "ViT-B-16@openai", "--data", f"{mount}/data", "--mask", f"{mount}/mask/mask.safetensors",
            "--out", f"{mount}/out", "--steps", "100", "--device", "cuda"]


def _write_outputs(mount: Path):
    def on_complete(manifest: dict) -> None:  # what the job's rank 0 leaves on the PVC
        out = mount / "out"
        out.mkdir()
        (out / "delta.safetensors").write_bytes(b"delta")
        (out / "finetune.json").write_text(json.dumps({"processes": 8, "config": {"steps": 100}}))
    return on_complete


def _launch(host: str, mount: Path, **kw) -> dict:
    args = {"namespace": "team", "pvc": "saft-shared", "num_nodes": 2, "gpus_per_node": 4, "mount_path": str(mount),
            "image": "registry.example/saft:1.2", "poll_s": 0.0, "host": host, "log": lambda _msg: None,
            "sleep": lambda _s: None}
    return launch_trainjob(_argv(mount), **{**args, **kw})


def test_the_rendered_trainjob_carries_runtime_nodes_gpus_image_command_and_volume(tmp_path: Path) -> None:
    spec = TrainJobSpec(name="saft-ft", argv=_argv(tmp_path), pvc="saft-shared", num_nodes=3, gpus_per_node=8,
                        mount_path=str(tmp_path), image="registry.example/saft:1.2", cpu="16", memory="120Gi",
                        env={"SAFT_TRACKING": "off"})
    doc = render_trainjob(spec)
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob",
                                                                         "saft-ft")
    assert doc["spec"]["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                         "kind": "ClusterTrainingRuntime"}
    trainer = doc["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (3, 8, "registry.example/saft:1.2")
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "8"}, "requests": {"cpu": "16",
                                                                                          "memory": "120Gi"}}
    assert trainer["command"] == ["python3", "-m", "torch.distributed.run", "-m", "saft.cli", *_argv(tmp_path)]
    assert trainer["env"] == [{"name": "SAFT_TRACKING", "value": "off"}]
    (override,) = doc["spec"]["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    assert override["spec"]["volumes"] == [{"name": "saft-data", "persistentVolumeClaim": {"claimName": "saft-shared"}}]
    assert override["spec"]["containers"] == [{"name": "node", "volumeMounts": [{"name": "saft-data",
                                                                                  "mountPath": str(tmp_path)}]}]
    spec.patch_api = "runtimePatches"
    patched = render_trainjob(spec)["spec"]
    assert "podTemplateOverrides" not in patched
    job = patched["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert job["name"] == "node" and job["template"]["spec"]["template"]["spec"] == override["spec"]


def test_bad_specs_are_refused_naming_the_field(tmp_path: Path) -> None:
    good = {"name": "saft-ft", "argv": _argv(tmp_path), "pvc": "p", "mount_path": str(tmp_path)}
    for change, needle in (({"name": "Saft_FT"}, "DNS label"), ({"num_nodes": 0}, "num_nodes"),
                           ({"argv": ["score", "--out", f"{tmp_path}/o"]}, "saft finetune"), ({"pvc": ""}, "pvc"),
                           ({"argv": _argv(tmp_path) + ["--mask", "/elsewhere/m"]}, "--mask /elsewhere/m"),
                           ({"patch_api": "x"}, "patch_api")):
        with pytest.raises(TrainJobError, match=needle):
            render_trainjob(TrainJobSpec(**{**good, **change}))
    assert job_name(_argv(tmp_path)) == job_name(_argv(tmp_path)) != job_name(_argv(tmp_path) + ["--seed", "1"])
    assert len(job_name(["finetune"] * 3, prefix="x" * 80)) <= 63


def test_create_poll_complete_returns_the_outputs(api, tmp_path: Path) -> None:
    fake = FakeTrainer(run_reads=2, on_complete=_write_outputs(tmp_path))
    result = _launch(api(fake), tmp_path)
    assert result["condition"]["type"] == "Complete"
    assert result["outputs"] == ["delta.safetensors", "finetune.json"] and result["summary"]["processes"] == 8
    assert result["out_dir"] == str(tmp_path / "out")
    methods = [(r["method"], r["path"].split("?")[0].rsplit("/", 1)[-1]) for r in fake.requests]
    assert methods[0] == ("POST", "trainjobs") and methods.count(("GET", result["name"])) == 3
    assert fake.requests[0]["body"]["spec"]["trainer"]["numNodes"] == 2


def test_a_retry_waits_for_the_job_it_already_submitted(api, tmp_path: Path) -> None:
    fake = FakeTrainer(run_reads=1, on_complete=_write_outputs(tmp_path))
    host = api(fake)
    fake.objects[("team", job_name(_argv(tmp_path)))] = {"metadata": {"name": job_name(_argv(tmp_path))}}
    assert _launch(host, tmp_path)["condition"]["type"] == "Complete"
    assert [r["method"] for r in fake.requests].count("POST") == 1  # the 409, then polling the existing job


def test_a_failed_job_raises_with_its_condition_message(api, tmp_path: Path) -> None:
    fake = FakeTrainer(run_reads=1, fail_message="jobset node-1 failed: container node exited with 137 (OOMKilled)")
    with pytest.raises(TrainJobError, match=r"failed: JobFailed: jobset node-1 failed: .*OOMKilled"):
        _launch(api(fake), tmp_path)


def test_a_job_past_the_timeout_is_deleted_and_reported(api, tmp_path: Path) -> None:
    fake = FakeTrainer(run_reads=None)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += 10.0

    with pytest.raises(TrainJobError, match=r"did not finish within 25 s \(conditions: Created=True\).*deleted"):
        _launch(api(fake), tmp_path, timeout_s=25, sleep=sleep, clock=lambda: now[0])
    assert fake.objects == {} and fake.requests[-1]["method"] == "DELETE"


def test_api_refusal_and_missing_outputs_are_clear_errors(api, tmp_path: Path) -> None:
    fake = FakeTrainer()
    fake.forbidden.add("team")
    with pytest.raises(TrainJobError, match=r"submitting TrainJob team/.* HTTP 403 .*cannot create resource"):
        _launch(api(fake), tmp_path)
    with pytest.raises(TrainJobError, match="must mount the PVC saft-shared"):
        _launch(api(FakeTrainer(run_reads=0)), tmp_path)  # complete, but nothing under --out here
