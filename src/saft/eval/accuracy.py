"""Top-1 accuracy of a CLIP model with a zero-shot head built from class prompts."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from saft.eval.runner import evaluate_head
from saft.sparse.objective import ClassPrompts, class_embeddings


def top1_accuracy(
    model: torch.nn.Module,
    dataset: Dataset,
    prompts: ClassPrompts,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> float:
    """Fraction of ``(image, label)`` pairs whose nearest class prompt is the label."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    with torch.inference_mode():
        head = class_embeddings(model.eval(), prompts.to(device))
    model.train(was_training)
    return evaluate_head(model, head, dataset, batch_size=batch_size, device=device, progress=progress).top1
