"""A content hash of a model: deltas, masks and head caches name the exact base they belong to.

Two things decide what a CLIP model computes: its weights and its configuration. The
same state dict built once with GELU and once with QuickGELU activations gives different
outputs (OpenAI's CLIP weights were trained with QuickGELU; open_clip's plain ``ViT-B-16``
config uses GELU), so a fingerprint over the weights alone would let a delta or a cached
head cross from one build to the other silently.

The fingerprint of a model loaded by :func:`saft.models.load_model` is therefore the
sha256 of

* the weights digest: sha256 over (name, dtype, shape, raw bytes) of every tensor of the
  state dict, buffers included, in sorted name order; and
* the canonical JSON (sorted keys) of the configuration that changes outputs: the
  resolved open_clip model configuration (``embed_dim``, ``vision_cfg``, ``text_cfg``,
  ``quick_gelu`` always stated, plus any other key of the architecture's config file) and
  the image preprocessing the model is served with (``size``, ``mode``, ``mean``, ``std``,
  ``interpolation``, ``resize_mode``, ``fill_color``).

A model built elsewhere (without ``saft_model_config``) is fingerprinted by its weights
digest alone.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import torch

FINGERPRINT_SCHEME = "saft-fingerprint/2"
CONFIG_ATTR = "saft_model_config"


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
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


def canonical_config(config: Mapping[str, Any]) -> str:
    """The configuration as sorted-key JSON (tuples become lists), the form that is hashed."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=list)


def fingerprint_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None) -> str:
    """The fingerprint of these weights under ``config`` (weights digest alone without one)."""
    weights = weights_digest(state_dict)
    if config is None:
        return weights
    payload = f"{FINGERPRINT_SCHEME}\n{weights}\n{canonical_config(config)}"
    return hashlib.sha256(payload.encode()).hexdigest()


def fingerprint_model(model: torch.nn.Module) -> str:
    """The fingerprint of the model's current weights and the configuration it was loaded with."""
    return fingerprint_state_dict(model.state_dict(), getattr(model, CONFIG_ATTR, None))
