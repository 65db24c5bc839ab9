"""Top-1 accuracy of a CLIP model with a zero-shot head built from class prompts."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from saft.eval.runner import evaluate_head
from saft.sparse.delta import Delta, apply_delta, remove_delta
from saft.sparse.objective import ClassPrompts, class_embeddings


def top1_accuracy(
    model: torch.nn.Module,
    dataset: Dataset,
    prompts: ClassPrompts,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
    head_offsets: torch.Tensor | None = None,
) -> float:
    """Fraction of ``(image, label)`` pairs whose nearest class prompt is the label (``head_offsets`` added to the
    class embeddings: a delta's trained head, :meth:`saft.sparse.delta.Delta.head_offsets`)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    with torch.inference_mode():
        head = class_embeddings(model.eval(), prompts.to(device))
        if head_offsets is not None:
            head = head + head_offsets.to(device=device, dtype=head.dtype)
    model.train(was_training)
    return evaluate_head(model, head, dataset, batch_size=batch_size, device=device, progress=progress).top1


def delta_top1(model: torch.nn.Module, delta: Delta, dataset: Dataset, prompts: ClassPrompts, *, alpha: float = 1.0,
               batch_size: int = 256, device: str | torch.device | None = None) -> float:
    """Top-1 of base + ``alpha`` * ``delta`` (weights merged, head offsets added); the base is restored bit for bit.

    The delta's fingerprint is not checked here: the caller loaded it for this base.
    """
    offsets = None
    if delta.head is not None:
        if len(prompts.class_names) != prompts.n_classes:
            raise ValueError("the delta carries a trained head (lpft): build the prompts with their class names "
                             "(ClassPrompts.build) so its rows can be matched")
        offsets = delta.head_offsets(prompts.class_names, alpha)
    apply_delta(model, delta, alpha, check_fingerprint=False)
    try:
        return top1_accuracy(model, dataset, prompts, batch_size=batch_size, device=device, head_offsets=offsets)
    finally:
        remove_delta(model, delta)
