"""A pipeline task on a pod with several GPUs runs its step as one process per GPU (torchrun).

The score, finetune and evaluate tasks are run here with ``SAFT_TASK_PROCESSES=2`` (two
gloo ranks on the CPU, the path a 2-GPU pod takes with NCCL) next to the same task as one
process: the same mask bytes, a delta within the distributed tests' tolerance, the same
metrics, the same record files downstream tasks read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_distributed import _env, toy_world

from saft.eval.suites import load_suite, suite_document
from saft.steps.configs import FinetuneStepConfig
from saft.orchestration.eval_tasks import evaluate_task
from saft.orchestration.torchrun import PROCESSES_ENV, LaunchError, task_processes
from saft.sparse.distributed import values_agree
from saft.steps.score import ScoreConfig
from saft.orchestration.tasks import finetune_task, score_task


def test_task_processes_is_one_per_visible_gpu_or_the_override() -> None:
    assert task_processes("cpu", env={}) == 1
    assert task_processes("cuda:1", env={}) == 1  # a device that names one GPU is one process
    expected = max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    assert task_processes("cuda", env={}) == task_processes("auto", env={}) == expected
    assert task_processes("cpu", env={PROCESSES_ENV: "3"}) == 3
    for bad in ("0", "two", "-1"):
        with pytest.raises(LaunchError, match=PROCESSES_ENV):
            task_processes("cpu", env={PROCESSES_ENV: bad})


def test_a_suite_document_loads_back_to_the_same_suite(tmp_path: Path) -> None:
    suite = load_suite("base2new", "/data")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(suite_document(suite)))
    assert load_suite(str(path)) == suite
    shifts = load_suite("imagenet-shifts", "s3://bucket/root")
    path.write_text(yaml.safe_dump(suite_document(shifts)))
    assert load_suite(str(path), "/elsewhere") == shifts  # resolved roots stay as they are


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return toy_world(tmp_path_factory.mktemp("tasks"), pool=6, test=3, shots=2)  # 20 training images


@pytest.mark.slow
def test_score_finetune_and_evaluate_tasks_on_two_processes_match_one(world: Path, monkeypatch) -> None:
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(world)
    out: dict[int, dict] = {}
    for processes in (1, 2):
        monkeypatch.setenv(PROCESSES_ENV, str(processes))
        lines: list[str] = []
        tag = str(processes)
        stats = score_task("D", f"M{tag}", ScoreConfig(model="tiny", density=0.01, batch_size=4, device="cpu",
                                                       num_workers=0), log=lines.append)
        cfg = FinetuneStepConfig(model="tiny", method="saft", steps=4, batch_size=8, lr=3e-3, checkpoint_every=2,
                                 num_workers=0, device="cpu")
        summary = finetune_task("D", f"M{tag}", f"F{tag}", cfg, log=lines.append,
                                checkpoint_root=str(world / f"C{tag}"))
        doc = evaluate_task("tiny", "W", "toy.yaml", str(world), "", f"F{tag}", f"E{tag}", alphas=[1.0],
                            batch_size=7, device="cpu")
        launched = [line for line in lines if line.startswith("launch:")]
        assert bool(launched) == (processes > 1), launched  # the torchrun path is the one taken, and only then
        out[processes] = {"stats": stats, "summary": summary, "doc": doc}
    assert (world / "M1/mask.safetensors").read_bytes() == (world / "M2/mask.safetensors").read_bytes()
    assert out[1]["stats"]["num_selected"] == out[2]["stats"]["num_selected"] > 0
    assert json.loads((world / "M2/score.json").read_text())["processes"] == 2
    one, two = load_file(world / "F1/delta.safetensors"), load_file(world / "F2/delta.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        if one[name].is_floating_point():
            check = values_agree(one[name], two[name])
            assert check["passed"], (name, check)
        else:
            assert torch.equal(one[name], two[name]), name
    assert json.loads((world / "F2/finetune.json").read_text())["processes"] == 2
    assert out[2]["summary"]["resumed_from_step"] == 0
    assert not any((world / "C2").glob("finetune-*"))  # the run's checkpoints go once the delta is written
    assert _accuracies(out[1]["doc"]) == _accuracies(out[2]["doc"])
    assert len(out[2]["doc"]["records"]) == 4  # zero-shot and the delta on both sets


def _accuracies(doc: dict) -> list[tuple]:
    return sorted((r["model"], r["dataset"], r["seed"], r["alpha"], r["top1"], r["n"]) for r in doc["records"])
