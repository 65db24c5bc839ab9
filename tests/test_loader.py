"""DataLoader defaults follow the task's CPUs."""

import pytest

import saft.loader as loader
from saft.loader import LoaderOptions


@pytest.mark.parametrize("cpus, gpu, cpu", [(1, 0, 0), (2, 1, 0), (4, 3, 1), (16, 8, 4), (64, 8, 4)])
def test_auto_workers_from_the_task_cpus(monkeypatch, cpus, gpu, cpu):
    monkeypatch.setattr(loader, "task_cpus", lambda: cpus)
    assert LoaderOptions().workers("cuda") == gpu
    assert LoaderOptions().workers("cpu") == cpu
    assert LoaderOptions(num_workers=3).workers("cpu") == 3  # an explicit count is kept


def test_cgroup_quota_caps_the_affinity(monkeypatch):
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(loader, "_cgroup_quota", lambda: 6)  # a Kubernetes CPU limit of 6
    assert loader.task_cpus() == 6
    monkeypatch.setattr(loader, "_cgroup_quota", lambda: None)
    assert loader.task_cpus() == 64


def test_loader_kwargs_pin_only_on_cuda_and_persist_only_with_workers():
    on_cpu = LoaderOptions(num_workers=2).kwargs("cpu")
    assert on_cpu["num_workers"] == 2 and on_cpu["pin_memory"] is False and on_cpu["persistent_workers"] is True
    assert LoaderOptions(num_workers=2).kwargs("cuda")["pin_memory"] is True
    assert "persistent_workers" not in LoaderOptions(num_workers=0).kwargs("cuda")
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        LoaderOptions(num_workers=-2)
