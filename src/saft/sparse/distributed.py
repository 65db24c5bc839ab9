"""Several processes, one result: the pieces of torch.distributed the library uses.

``saft score``, ``saft finetune`` and ``saft evaluate`` run unchanged under ``torchrun``
(one node: ``--nproc_per_node=N``; several: the standard rendezvous variables). The
launcher sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; :func:`from_env` joins the process
group (NCCL on GPUs, gloo on the CPU) and gives each rank its GPU. One process is the
special case ``world == 1``: every collective below is then a no-op, so the same code
path serves both.

What is split and what is summed (see the callers):

* scoring: each rank takes every ``world``-th batch; the fp32 accumulators, dL/dT and the
  example count are summed, and each rank back-propagates dL/dT through its share of the
  classes, so the scores are those of one process over all batches;
* training: each global batch of the seeded stream is cut into ``world`` equal parts
  (rank r gets part r), so the global batch order is the single-process one; each rank's
  loss is its part's summed cross-entropy over the global batch size, and the gradients
  of the trained tensors are summed (the text side: dL/dT summed, then each rank
  back-propagates its share of the classes);
* evaluation: each rank scores every ``world``-th batch; correct counts are summed.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Iterable, Sequence, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``Dist()`` is a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (a no-op for one process)."""
        if self.active:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def sum_int(self, value: int, device: torch.device | str = "cpu") -> int:
        if not self.active:
            return int(value)
        return int(self.all_reduce(torch.tensor([value], dtype=torch.int64, device=self.comm_device(device))).item())

    def all_reduce_grads(self, params: Iterable[torch.Tensor]) -> None:
        """Sum the gradients of ``params`` over the ranks (a missing gradient counts as zero)."""
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.all_reduce(p.grad)

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def broadcast_flag(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """Rank 0's ``flag`` on every rank (a decision taken once, e.g. "outputs are up to date")."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64, device=self.comm_device(device))
        torch_dist.broadcast(t, src=0)
        return bool(t.item())

    def batches(self, batches: Iterable[T]) -> Iterable[T]:
        """Every ``world``-th item, starting at this rank's position."""
        for i, item in enumerate(batches):
            if i % self.world == self.rank:
                yield item

    def part(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's equal contiguous part of ``items`` (``len(items)`` must divide by ``world``)."""
        if len(items) % self.world:
            raise ValueError(f"{len(items)} items cannot be split into {self.world} equal parts")
        size = len(items) // self.world
        return items[self.rank * size:(self.rank + 1) * size]

    def comm_device(self, device) -> torch.device:
        """Where collectives run: the device for NCCL, the CPU for gloo."""
        backend = torch_dist.get_backend() if torch_dist.is_initialized() else "gloo"
        return torch.device(device) if backend == "nccl" else torch.device("cpu")


SINGLE = Dist()


VALUE_TOLERANCE = 1e-4
"""Values trained by N processes vs one (the same global batch): the same fp32 sums in another
order, so each entry within this fraction of its tensor's largest |value| ..."""
NEAR_TIE_SHARE = 1e-3
NEAR_TIE_TOLERANCE = 1e-2
"""... except a few (this share of a tensor's entries, at least one), within this fraction: AdamW
divides each entry's gradient by its own running RMS, so an entry whose gradient is a near-cancellation
(small against the terms it sums) carries the sums' relative rounding, ~1e-3 for it, into its update
(observed: 1 of 4,102 patch-embedding entries at 3.3e-4 after 8 steps, every other entry below 1e-5)."""
VALUES_RULE = (f"per tensor, |diff| <= {VALUE_TOLERANCE:g} x max|value| for all but {NEAR_TIE_SHARE:.1%} of the "
               f"entries (at least one), those <= {NEAR_TIE_TOLERANCE:g} x max|value|")


def values_agree(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Compare one tensor's trained values with the one-process ``reference`` by :data:`VALUES_RULE`."""
    ref, oth = reference.detach().float().reshape(-1).cpu(), other.detach().float().reshape(-1).cpu()
    if ref.shape != oth.shape:
        return {"max_abs_diff": float("inf"), "max_abs_value": 0.0, "beyond_tolerance": max(ref.numel(), oth.numel()),
                "allowed_beyond": 0, "passed": False, "reason": f"{oth.numel()} values vs {ref.numel()}"}
    scale = (float(ref.abs().max()) if ref.numel() else 0.0) or 1.0
    diff = (ref - oth).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    beyond = int((diff > VALUE_TOLERANCE * scale).sum())
    allowed = max(1, math.ceil(NEAR_TIE_SHARE * ref.numel()))
    return {"max_abs_diff": worst, "max_abs_value": scale, "beyond_tolerance": beyond, "allowed_beyond": allowed,
            "passed": beyond <= allowed and worst <= NEAR_TIE_TOLERANCE * scale}


def resolve_device(device: str) -> str:
    """``auto``: CUDA when a GPU is visible (cluster nodes), else the CPU (laptops, CI)."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def from_env(device: str = "cpu") -> tuple[Dist, str]:
    """Join the job torchrun started (if any) and return it with this rank's device.

    Without ``WORLD_SIZE`` > 1 this is one process and ``device`` is returned as given.
    Under torchrun, ``cuda`` becomes ``cuda:LOCAL_RANK`` and the NCCL backend is used;
    the CPU uses gloo. Calling it again returns the same job.
    """
    device = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not torch_dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get("SAFT_DIST_TIMEOUT_S", "1800")))
        torch_dist.init_process_group(backend=backend, timeout=timeout)
    return Dist(rank, world, local), device
