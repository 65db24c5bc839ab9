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
import torch.nn.functional as F

from saft.io import load_tensors, save_tensors
from saft.progress import progress_bar

HEAD_FORMAT = "saft-head/1"


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
    classes_per_batch: int = 32,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Unit-norm class embeddings [n_classes, dim], the renormalised template mean per class."""
    if not class_names or not templates:
        raise ValueError("a head needs at least one class name and one template")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    starts = range(0, len(class_names), classes_per_batch)
    for start in progress_bar(starts, enabled=progress, desc="text head", unit="batch"):
        names = class_names[start:start + classes_per_batch]
        tokens = tokenizer([t.format(n) for n in names for t in templates]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            emb = model.encode_text(tokens)
        emb = F.normalize(emb.float(), dim=-1).reshape(len(names), len(templates), -1).mean(1)
        rows.append(F.normalize(emb, dim=-1))
    model.train(was_training)
    return torch.cat(rows)


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
