"""DataLoader settings shared by scoring, training and evaluation (a utility of every layer, like saft.io).

Decoding and resizing a 224 px JPEG costs a few milliseconds of CPU; a GPU step over a
batch of 64 costs about as much as decoding a handful, so a single-process loader
starves the GPU. ``num_workers=-1`` (the default everywhere: library, CLI, params.yaml,
components) picks a worker count from the CPUs the task may use, i.e. the smaller of the
CPU affinity and the cgroup CPU quota (a Kubernetes CPU limit):

* on a GPU: ``min(8, cpus - 1)`` workers, leaving one CPU for the training process;
* on the CPU: ``min(4, cpus // 2 - 1)`` (0 on a 2-core machine), since the model itself
  then computes on those cores.

Pinned memory is used on CUDA only, and persistent workers whenever there are workers.
Worker processes get seeds from a generator seeded with ``seed``, so any randomness in
a transform is reproducible (the evaluation transforms draw none).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from saft.config import setting

if TYPE_CHECKING:
    import torch

AUTO_WORKERS = -1


def task_cpus() -> int:
    """CPUs this process may use: affinity, capped by a cgroup (v2 or v1) CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, quota)) if quota else max(1, cpus)


def _cgroup_quota() -> int | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return max(1, int(int(text[0]) / int(text[1])))
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return max(1, quota // period)
    except (OSError, ValueError):
        pass
    return None


def auto_workers(device: "str | torch.device") -> int:
    import torch

    cpus = task_cpus()
    if torch.device(device).type == "cuda":
        return max(0, min(8, cpus - 1))
    return max(0, min(4, cpus // 2 - 1))


@dataclass
class LoaderSettings:
    """The DataLoader settings of every step that reads images (a ``loader:`` section in params.yaml)."""

    FLAGS_LAST = True  # after each step's own flags in --help (saft.config)

    num_workers: int = setting(AUTO_WORKERS, minimum=AUTO_WORKERS,
                               help="DataLoader worker processes; -1 chooses from the task's CPUs (GPU: "
                                    "min(8, cpus-1), CPU: min(4, cpus//2-1))")
    pin_memory: bool = setting(True, help="pinned host memory for batches (CUDA only)")
    persistent_workers: bool = setting(True, help="keep loader workers alive between passes")

    @property
    def loader(self) -> "LoaderOptions":
        return LoaderOptions(self.num_workers, self.pin_memory, self.persistent_workers)


@dataclass(frozen=True)
class LoaderOptions:
    """``num_workers`` (-1: from the task's CPUs), ``pin_memory`` (CUDA only), ``persistent_workers``."""

    num_workers: int = AUTO_WORKERS
    pin_memory: bool = True
    persistent_workers: bool = True

    def __post_init__(self) -> None:
        if self.num_workers < AUTO_WORKERS:
            raise ValueError(f"num_workers must be >= 0, or -1 to choose from the CPUs, got {self.num_workers}")

    def workers(self, device: "str | torch.device") -> int:
        return auto_workers(device) if self.num_workers == AUTO_WORKERS else self.num_workers

    def kwargs(self, device: "str | torch.device", seed: int = 0) -> dict:
        """Keyword arguments for ``torch.utils.data.DataLoader``."""
        import torch

        workers = self.workers(device)
        out = {"num_workers": workers, "pin_memory": self.pin_memory and torch.device(device).type == "cuda",
               "generator": torch.Generator().manual_seed(seed)}
        if workers:
            out["persistent_workers"] = self.persistent_workers
        return out
