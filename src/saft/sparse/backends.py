"""The CUDA backend choices every training run makes, in one place, explicitly.

- TF32: off for ``precision: fp32`` (fp32 then means fp32 matmuls, so a run can be compared
  with a CPU run or a reference to fp32 rounding); on under autocast (bf16/fp16), where the
  fp32 matmuls left are the optimizer's and norms' small ones and TF32 costs nothing visible.
- cuDNN: ``benchmark`` off (CLIP's image side uses no cuDNN convolution on the sparse path,
  and autotuning would pick kernels by timing, which differs run to run).
- ``SAFT_DETERMINISTIC=1``: ``torch.use_deterministic_algorithms(True)`` and the cuBLAS
  workspace setting it needs; the sparse kernels scatter with ``index_put`` on unique
  indices, so every op of a SAFT step has a deterministic implementation.
DataLoader workers are seeded from the run's seed (``saft.loader.LoaderOptions.kwargs``).
"""

from __future__ import annotations

import os

import torch


def deterministic_requested() -> bool:
    return os.environ.get("SAFT_DETERMINISTIC", "").strip().lower() in ("1", "true", "yes", "on")


def configure_backends(device: torch.device, *, autocast: bool) -> dict:
    """Set the flags for a run on ``device``; returns what was set."""
    chosen = {"deterministic": deterministic_requested()}
    if chosen["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = autocast
        torch.backends.cudnn.allow_tf32 = autocast
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = chosen["deterministic"]
        chosen.update(tf32=autocast, cudnn_benchmark=False)
    return chosen


__all__ = ["configure_backends", "deterministic_requested"]
