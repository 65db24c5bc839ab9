"""A content hash of model weights: deltas and masks name the exact base they belong to."""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch


def fingerprint_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in sorted name order.

    Buffers are included: two models that differ only in, say, BatchNorm statistics
    do not produce the same outputs and must not share a fingerprint.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def fingerprint_model(model: torch.nn.Module) -> str:
    return fingerprint_state_dict(model.state_dict())
