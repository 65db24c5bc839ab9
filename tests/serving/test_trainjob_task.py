"""The retrain pipeline's multi-node launcher task against a local endpoint answering like the Kubernetes API.

The fake Trainer controller "runs" each TrainJob by executing the command line of its
manifest (``saft finetune ...`` after ``-m saft.cli``) on this machine, reading and writing
the shared volume (a folder here) as the job's rank 0 would; the fake node has no GPU, so
the manifest's ``--device cuda`` becomes ``cpu``. The launcher must stage what the nodes
read, submit one job, and hand the job's delta on as a finetune task's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_kube import FakeTrainer, serve_fake
from safetensors.torch import load_file

from saft.cli import main
from saft.orchestration.trainjob_task import finetune_trainjob_task, trainjob_options
from saft.steps.configs import FinetuneStepConfig, ScoreConfig
from saft.orchestration.tasks import finetune_task, score_task


def _run_manifest(seen: list):
    def on_complete(manifest: dict) -> None:
        command = manifest["spec"]["trainer"]["command"]
        argv = command[command.index("saft.cli") + 1:]
        argv[argv.index("--device") + 1] = "cpu"
        data = Path(argv[argv.index("--data") + 1])
        seen.append({"argv": argv, "staged_images": sorted(p.name for p in (data / "files").rglob("*.png"))})
        assert main(argv) == 0
    return on_complete


@pytest.fixture
def prepared(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAFT_TRACKING", "off")
    monkeypatch.delenv("SAFT_PARENT_RUN_ID", raising=False)
    assert main(["world", "--out", "W", "--pool-per-class", "4", "--test-per-class", "1"]) == 0
    assert main(["data", "prepare", "--val-shots", "0", "W/photo/pool", "--shots", "2", "--out", "D"]) == 0
    score_task("D", "M", ScoreConfig(model="tiny", density=0.01, batch_size=4, device="cpu", num_workers=0))
    return tmp_path


def test_the_launcher_stages_submits_waits_and_hands_on_the_jobs_delta(prepared: Path) -> None:
    seen: list = []
    fake = FakeTrainer(run_reads=1, on_complete=_run_manifest(seen))
    server = serve_fake(fake)
    host = f"http://127.0.0.1:{server.server_address[1]}"
    cfg = FinetuneStepConfig(model="tiny", method="saft", steps=3, batch_size=4, lr=3e-3, checkpoint_every=1,
                             num_workers=0, device="cpu")
    lines: list[str] = []
    try:
        summary = finetune_trainjob_task("D", "M", "F", cfg, shared_root=str(prepared / "pvc"),
                                         pvc="saft-shared", nodes=2, gpus_per_node=2, log=lines.append,
                                         settings={"namespace": "team", "poll_s": 0, "host": host,
                                                   "runtime": "torch-distributed", "image": ""},
                                         image="registry.example/saft:1")
    finally:
        server.shutdown()
    creates = [r for r in fake.requests if r["method"] == "POST"]
    assert len(creates) == 1 and creates[0]["path"].startswith("/apis/trainer.kubeflow.org/v1alpha1/namespaces/team/")
    trainer = creates[0]["body"]["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (2, 2, "registry.example/saft:1")
    (job,) = seen
    shared = str(prepared / "pvc")
    for flag in ("--data", "--out", "--mask", "--checkpoint-dir", "--root"):
        assert job["argv"][job["argv"].index(flag) + 1].startswith(shared), flag  # every node sees it
    assert "--resume" in job["argv"]  # a retried launcher's job continues from its checkpoints
    assert len(job["staged_images"]) == 20  # the drawn images travel to the volume, not the whole root
    for name in ("delta.safetensors", "history.json", "finetune.json", "trainjob.json"):
        assert (prepared / "F" / name).is_file(), name
    record = json.loads((prepared / "F/trainjob.json").read_text())
    assert record["nodes"] == 2 and record["condition"]["reason"] == "AllJobsCompleted"
    assert record["queued_s"] == 0 and record["running_s"] >= 0
    assert creates[0]["body"]["spec"]["activeDeadlineSeconds"] == 6 * 3600  # the default running-time limit
    assert summary["trainjob"] == creates[0]["body"]["metadata"]["name"]
    assert not any((prepared / "pvc" / "trainjobs").iterdir())  # the staged folder goes once the delta is out
    # the same training in one pod gives the same delta (the fake job ran as one process)
    finetune_task("D", "M", "G", cfg)
    one, job_delta = load_file(prepared / "G/delta.safetensors"), load_file(prepared / "F/delta.safetensors")
    assert one.keys() == job_delta.keys() and all((one[k] == job_delta[k]).all() for k in one)


def test_the_launcher_refuses_what_the_job_could_not_run(prepared: Path) -> None:
    cfg = FinetuneStepConfig(model="tiny", method="saft", steps=2, batch_size=6, lr=3e-3, num_workers=0)
    with pytest.raises(ValueError, match="batch_size 6 must divide by the 4 processes"):
        finetune_trainjob_task("D", "M", "F", cfg, shared_root="/mnt/x", pvc="p", nodes=2, gpus_per_node=2)
    with pytest.raises(ValueError, match="unknown field.*numNodes"):
        trainjob_options({"numNodes": 3})
    assert trainjob_options('{"image": "", "poll_s": 5, "cpu": ""}', image="img") == {"image": "img", "poll_s": 5.0}
    assert trainjob_options({"queue": "team-gpus", "queue_timeout_s": 600}) == {"queue": "team-gpus",
                                                                                "queue_timeout_s": 600.0}
