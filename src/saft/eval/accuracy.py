"""Top-1 accuracy of a CLIP model with a zero-shot head built from class prompts."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from saft.progress import progress_bar

from saft.sparse.objective import ClassPrompts, class_embeddings, clip_logits


@torch.inference_mode()
def top1_accuracy(
    model: torch.nn.Module,
    dataset: Dataset,
    prompts: ClassPrompts,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    desc: str = "evaluating",
) -> float:
    """Fraction of ``(image, label)`` pairs whose nearest class prompt is the label."""
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    head = class_embeddings(model, prompts.to(device))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    correct = 0
    use_amp = device.type == "cuda"
    for images, labels in progress_bar(loader, enabled=progress, desc=desc, unit="batch"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = clip_logits(model, images.to(device), head)
        correct += int((logits.argmax(-1).cpu() == labels).sum())
    model.train(was_training)
    return correct / len(dataset)
