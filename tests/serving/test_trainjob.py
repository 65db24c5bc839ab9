"""saft.orchestration.trainjob against a local endpoint answering like the Kubernetes API with Kubeflow
Trainer (and Kueue) installed: tests/serving/fake_kube.py's FakeTrainer."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from fake_apiserver import api  # noqa: F401  (a fixture)
from fake_kube import FakeTrainer

from saft.orchestration.trainjob import (
    TrainJobError,
    TrainJobSpec,
    job_name,
    launch_trainjob,
    render_trainjob,
)

JOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team/trainjobs"


class Clock:
    """The launcher's and the fake controller's time: each poll advances it by ``step`` seconds."""

    def __init__(self, step: float = 10.0):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        return self.now

    def sleep(self, _seconds: float) -> None:
        self.now += self.step


def _argv(mount: Path) -> list[str]:
    return ["finetune", "--model", "ViT-B-16@openai", "--data", f"{mount}/data", "--mask", f"{mount}/mask/mask.safetensors",
            "--out", f"{mount}/out", "--steps", "100", "--device", "cuda"]


def _write_outputs(mount: Path):
    def on_complete(manifest: dict) -> None:  # what the job's rank 0 leaves on the PVC
        out = mount / "out"
        out.mkdir(exist_ok=True)
        (out / "delta.safetensors").write_bytes(b"delta")
        (out / "finetune.json").write_text(json.dumps({"processes": 8, "config": {"steps": 100}}))
    return on_complete


def _launch(host: str, mount: Path, lines: list | None = None, **kw) -> dict:
    args = {"namespace": "team", "pvc": "saft-shared", "num_nodes": 2, "gpus_per_node": 4, "mount_path": str(mount),
            "image": "registry.example/saft:1.2", "poll_s": 0.0, "host": host,
            "log": (lines.append if lines is not None else lambda _msg: None), "sleep": lambda _s: None}
    return launch_trainjob(_argv(mount), **{**args, **kw})


def test_the_rendered_trainjob_carries_runtime_nodes_gpus_image_command_volume_and_deadline(tmp_path: Path) -> None:
    spec = TrainJobSpec(name="saft-ft", argv=_argv(tmp_path), pvc="saft-shared", num_nodes=3, gpus_per_node=8,
                        mount_path=str(tmp_path), image="registry.example/saft:1.2", cpu="16", memory="120Gi",
                        env={"SAFT_TRACKING": "off"}, active_deadline_s=3600, queue="team-gpus")
    doc = render_trainjob(spec)
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob",
                                                                         "saft-ft")
    assert doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"
    assert doc["spec"]["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                         "kind": "ClusterTrainingRuntime"}
    assert doc["spec"]["activeDeadlineSeconds"] == 3600
    trainer = doc["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (3, 8, "registry.example/saft:1.2")
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "8"}, "requests": {"cpu": "16",
                                                                                          "memory": "120Gi"}}
    assert trainer["command"] == ["python3", "-m", "torch.distributed.run", "-m", "saft.cli", *_argv(tmp_path)]
    assert trainer["env"] == [{"name": "SAFT_TRACKING", "value": "off"}]
    (patch,) = doc["spec"]["runtimePatches"]  # Trainer v2.2+ (the default generation)
    assert patch["manager"] == "saft.io/launcher"
    job = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = job["template"]["spec"]["template"]["spec"]
    assert job["name"] == "node"
    assert pod["volumes"] == [{"name": "saft-data", "persistentVolumeClaim": {"claimName": "saft-shared"}}]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "saft-data", "mountPath": str(tmp_path)}]}]
    spec.patch_api, spec.active_deadline_s = "podTemplateOverrides", 0  # Trainer v2.0/v2.1: no deadline field
    older = render_trainjob(spec)["spec"]
    assert "runtimePatches" not in older and "activeDeadlineSeconds" not in older
    (override,) = older["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}] and override["spec"] == pod


def test_bad_specs_are_refused_naming_the_field(tmp_path: Path) -> None:
    good = {"name": "saft-ft", "argv": _argv(tmp_path), "pvc": "p", "mount_path": str(tmp_path)}
    for change, needle in (({"name": "Saft_FT"}, "DNS label"), ({"num_nodes": 0}, "num_nodes"),
                           ({"argv": ["score", "--out", f"{tmp_path}/o"]}, "saft finetune"), ({"pvc": ""}, "pvc"),
                           ({"argv": _argv(tmp_path) + ["--mask", "/elsewhere/m"]}, "--mask /elsewhere/m"),
                           ({"patch_api": "x"}, "patch_api"), ({"active_deadline_s": -1}, "active_deadline_s"),
                           ({"patch_api": "podTemplateOverrides", "active_deadline_s": 60}, "from Trainer v2.2")):
        with pytest.raises(TrainJobError, match=needle):
            render_trainjob(TrainJobSpec(**{**good, **change}))
    assert job_name(_argv(tmp_path)) == job_name(_argv(tmp_path)) != job_name(_argv(tmp_path) + ["--seed", "1"])
    assert len(job_name(["finetune"] * 3, prefix="x" * 80)) <= 63


def test_create_poll_complete_returns_the_outputs(api, tmp_path: Path) -> None:
    fake = FakeTrainer(run_reads=2, on_complete=_write_outputs(tmp_path))
    result = _launch(api(fake), tmp_path, timeout_s=7200.5)
    assert result["condition"]["type"] == "Complete" and result["condition"]["reason"] == "AllJobsCompleted"
    assert result["outputs"] == ["delta.safetensors", "finetune.json"] and result["summary"]["processes"] == 8
    assert result["out_dir"] == str(tmp_path / "out") and result["queued_s"] == 0
    methods = [(r["method"], r["path"].rsplit("/", 1)[-1]) for r in fake.requests]
    assert methods[0] == ("POST", "trainjobs") and methods.count(("GET", result["name"])) == 3
    create = fake.requests[0]
    assert create["query"] == {"fieldValidation": "Strict"}
    assert create["body"]["spec"]["trainer"]["numNodes"] == 2
    assert create["body"]["spec"]["activeDeadlineSeconds"] == 7201  # the running time limit, in whole seconds
    # the conditions Trainer has (no "Created"): the job was running without any until it completed
    assert {c["type"] for c in fake.handle("GET", f"{JOBS}/{result['name']}", None, {})[1]["status"]["conditions"]} \
        == {"Complete"}


def test_a_manifest_of_the_wrong_trainer_generation_is_refused_with_the_fix(api, tmp_path: Path) -> None:
    fake = FakeTrainer(api="v2.1", run_reads=1, on_complete=_write_outputs(tmp_path))
    host = api(fake)
    with pytest.raises(TrainJobError, match=r'unknown field "spec.activeDeadlineSeconds".*set trainjob.patch_api: '
                                            r"podTemplateOverrides"):
        _launch(host, tmp_path)
    assert fake.objects == {}  # refused, not stored without its volumes and deadline
    lines: list[str] = []
    result = _launch(host, tmp_path, lines, patch_api="podTemplateOverrides")
    assert result["condition"]["type"] == "Complete"
    assert any("no activeDeadlineSeconds: only this launcher enforces" in line for line in lines)


def test_time_waiting_for_kueue_admission_is_not_running_time(api, tmp_path: Path) -> None:
    clock = Clock(step=10)
    # suspended for 5 polls (50 s), admitted at the 6th, then 2 polls running: queued longer than the 25 s running limit
    fake = FakeTrainer(queue_reads=5, run_reads=2, on_complete=_write_outputs(tmp_path), clock=clock)
    lines: list[str] = []
    result = _launch(api(fake), tmp_path, lines, queue="team-gpus", timeout_s=25, sleep=clock.sleep, clock=clock)
    assert result["condition"]["type"] == "Complete", result
    assert result["queued_s"] == 50 and result["running_s"] == 20
    assert fake.requests[0]["body"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"
    assert any("waits for admission (Suspended: Suspended" in line and "not count as running" in line for line in lines)
    assert any("admitted after 50 s" in line for line in lines)
    conditions = fake.handle("GET", f"{JOBS}/{result['name']}", None, {})[1]["status"]["conditions"]
    assert [(c["type"], c["status"], c["reason"]) for c in conditions] == [("Suspended", "False", "Resumed"),
                                                                          ("Complete", "True", "AllJobsCompleted")]


def test_a_job_past_its_deadline_is_stopped_by_trainer_and_reported_with_the_reason(api, tmp_path: Path) -> None:
    clock = Clock(step=10)
    fake = FakeTrainer(run_reads=None, clock=clock)
    with pytest.raises(TrainJobError, match=r"failed: DeadlineExceeded: Trainer stopped it at its "
                                            r"activeDeadlineSeconds \(25 s of running.*TrainJob exceeded its active "
                                            r"deadline.*timeout_s"):
        _launch(api(fake), tmp_path, timeout_s=25, sleep=clock.sleep, clock=clock)
    assert [r["method"] for r in fake.writes()] == ["POST"]  # Trainer acted; the launcher had nothing to delete


def test_a_job_never_admitted_is_deleted_after_the_queue_timeout(api, tmp_path: Path) -> None:
    clock = Clock(step=10)
    fake = FakeTrainer(queue_reads=None, clock=clock)
    with pytest.raises(TrainJobError, match=r"not admitted within 30 s \(Suspended: Suspended: TrainJob is suspended.*"
                                            r"deleted.*ClusterQueue.*queue_timeout_s"):
        _launch(api(fake), tmp_path, queue="team-gpus", queue_timeout_s=30, sleep=clock.sleep, clock=clock)
    (delete,) = [r for r in fake.writes() if r["method"] == "DELETE"]
    assert delete["query"]["propagationPolicy"] == "Foreground"


def test_without_a_deadline_field_the_launcher_deletes_a_job_past_the_timeout(api, tmp_path: Path) -> None:
    clock = Clock(step=10)
    fake = FakeTrainer(api="v2.1", run_reads=None, clock=clock, finalize_reads=1)
    with pytest.raises(TrainJobError, match=r"did not finish within 25 s of running \(conditions: none.*deleted"):
        _launch(api(fake), tmp_path, patch_api="podTemplateOverrides", timeout_s=25, sleep=clock.sleep, clock=clock)
    assert fake.requests[-1]["method"] == "DELETE"
    name = job_name(_argv(tmp_path))
    assert fake.objects[("team", name)]["metadata"]["deletionTimestamp"]  # terminating until its JobSet is gone
    fake.handle("GET", f"{JOBS}/{name}", None, {})
    assert fake.handle("GET", f"{JOBS}/{name}", None, {})[0] == 404


def test_sigterm_deletes_the_job_before_the_launcher_exits(api, tmp_path: Path) -> None:
    fake = FakeTrainer(run_reads=None)
    before = signal.getsignal(signal.SIGTERM)

    def cancelled(_seconds: float) -> None:  # KFP cancels the run while the launcher waits
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainJobError, match=r"stopped \(SIGTERM\); the job was deleted"):
        _launch(api(fake), tmp_path, sleep=cancelled)
    assert fake.writes()[-1]["method"] == "DELETE"
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_retried_launcher_waits_for_takes_or_replaces_the_job_it_submitted(api, tmp_path: Path) -> None:
    name = job_name(_argv(tmp_path))
    # running: the retry waits for it
    fake = FakeTrainer(run_reads=1, on_complete=_write_outputs(tmp_path))
    host = api(fake)
    assert fake.handle("POST", JOBS, render_trainjob(TrainJobSpec(name=name, argv=_argv(tmp_path), pvc="saft-shared",
                                                                  mount_path=str(tmp_path))), {})[0] == 201
    lines: list[str] = []
    assert _launch(host, tmp_path, lines)["condition"]["type"] == "Complete"
    assert [r["method"] for r in fake.writes()] == ["POST"] and any("already exists (a retry)" in x for x in lines)

    # complete: the retry takes its outputs without submitting anything
    fake.requests.clear()
    lines.clear()
    assert _launch(host, tmp_path, lines)["outputs"] == ["delta.safetensors", "finetune.json"]
    assert [r["method"] for r in fake.writes()] == ["POST"] and any("already completed" in x for x in lines)

    # failed: deleted (Foreground), waited out while it terminates (409 "being deleted"), submitted again
    failing = FakeTrainer(run_reads=0, fail_message="jobset node-1 failed: OOMKilled", finalize_reads=3)
    host = api(failing)
    with pytest.raises(TrainJobError, match="failed: FailedJobs: jobset node-1 failed: OOMKilled"):
        _launch(host, tmp_path)
    failing.fail_message, failing.on_complete = "", _write_outputs(tmp_path)
    failing.requests.clear()
    lines.clear()
    result = _launch(host, tmp_path, lines)
    assert result["condition"]["type"] == "Complete"
    writes = [(r["method"], r["query"].get("propagationPolicy")) for r in failing.writes()]
    assert writes[:2] == [("POST", None), ("DELETE", "Foreground")] and writes[-1] == ("POST", None)
    assert len(writes) >= 4  # at least one create refused while the failed job was still being deleted
    assert any("already failed (FailedJobs" in x and "replacing it" in x for x in lines)
    assert any("still being deleted" in x for x in lines)


def test_api_refusal_and_missing_outputs_are_clear_errors(api, tmp_path: Path) -> None:
    fake = FakeTrainer()
    fake.forbidden.add("team")
    with pytest.raises(TrainJobError, match=r"submitting TrainJob team/.* HTTP 403 .*cannot create resource"):
        _launch(api(fake), tmp_path)
    with pytest.raises(TrainJobError, match="must mount the PVC saft-shared"):
        _launch(api(FakeTrainer(run_reads=0)), tmp_path)  # complete, but nothing under --out here
    with pytest.raises(TrainJobError, match="queue_timeout_s"):
        _launch(api(FakeTrainer()), tmp_path, queue_timeout_s=0)
