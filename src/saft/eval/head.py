"""Zero-shot classification heads, built once per (model weights, classes, templates).

Encoding 1000 classes x 80 templates costs minutes on a CPU, so heads are cached on disk
under a key that names exactly what they depend on: the fingerprint of the weights the
text tower had, the class names and the templates.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from saft.io import load_tensors, save_tensors
from saft.sparse.objective import ClassPrompts, encode_classes

HEAD_FORMAT = "saft-head/1"
HEAD_TEXT_BATCH = 1024
"""Prompts encoded at once when building a head (no graph: only activations of one forward)."""


def default_cache_dir() -> Path:
    base = os.environ.get("SAFT_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "saft") / "heads"


def head_key(fingerprint: str, class_names: Sequence[str], templates: Sequence[str]) -> str:
    payload = json.dumps({"fp": fingerprint, "classes": list(class_names), "templates": list(templates)})
    return hashlib.sha256(payload.encode()).hexdigest()


@torch.inference_mode()
def build_head(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    classes_per_batch: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Unit-norm class embeddings [n_classes, dim], the renormalised template mean per class.

    Prompts are encoded ``classes_per_batch`` classes at a time (default: about
    ``HEAD_TEXT_BATCH`` prompts), each batch cut to its longest prompt, in bf16 on a GPU.
    """
    if not class_names or not templates:
        raise ValueError("a head needs at least one class name and one template")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    prompts = ClassPrompts.build(tokenizer, list(class_names), list(templates)).to(device)
    per_batch = classes_per_batch or max(1, HEAD_TEXT_BATCH // len(templates))

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    try:
        return encode_classes(model, prompts, text_batch=per_batch * len(templates), context=autocast,
                              progress=progress, desc="text head")
    finally:
        model.train(was_training)


def cached_head(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    fingerprint: str,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``build_head`` through the disk cache; ``fingerprint`` must describe the current weights."""
    key = head_key(fingerprint, class_names, templates)
    path = Path(cache_dir or default_cache_dir()) / f"{key}.safetensors"
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if path.is_file():
        try:
            tensors, _ = load_tensors(path, HEAD_FORMAT, "head")
            head = tensors["head"]
            if head.shape[0] == len(class_names):
                return head.to(device)
        except (ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt below
    head = build_head(model, tokenizer, class_names, templates, device=device, progress=progress)
    save_tensors(path, {"head": head}, {"fingerprint": fingerprint, "n_classes": str(len(class_names))}, HEAD_FORMAT)
    return head
