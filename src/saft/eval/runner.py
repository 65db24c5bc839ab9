"""Stream a dataset through the image tower and score it against a zero-shot head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from saft.progress import progress_bar
from saft.sparse.trainer import BatchOutOfMemoryError, is_out_of_memory


@dataclass(frozen=True)
class SubsetProjection:
    """Restrict logits to a subset of a larger label space (ImageNet-A/-R cover 200 of 1000).

    Labels stay in the large space; the prediction is the best class within the subset,
    which is what an explicit subset-way head would give.
    """

    indices: tuple[int, ...]

    def project_logits(self, logits: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(self.indices, device=logits.device)
        return logits.index_select(-1, idx)

    def to_full_labels(self, predictions: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(self.indices, device=predictions.device)
        return idx[predictions]


@dataclass(frozen=True)
class Accuracy:
    correct: int
    n: int

    @property
    def top1(self) -> float:
        return self.correct / self.n if self.n else 0.0


@torch.inference_mode()
def evaluate_head(
    model: torch.nn.Module,
    head: torch.Tensor,
    dataset: Dataset,
    *,
    subset: Sequence[int] | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    desc: str = "evaluating",
) -> Accuracy:
    """Top-1 of ``dataset`` (``(image, label)`` pairs) against unit-norm class embeddings ``head``."""
    if len(dataset) == 0:
        raise ValueError(f"{desc}: the dataset is empty")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    projection = SubsetProjection(tuple(subset)) if subset is not None else None
    was_training = model.training
    model.eval()
    head = head.to(device)
    scale = model.logit_scale.exp() if hasattr(model, "logit_scale") else 100.0
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    correct = n = 0
    bar = progress_bar(loader, enabled=progress, desc=desc, unit="batch")
    for images, labels in bar:
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                features = model.encode_image(images.to(device, non_blocking=True))
        except Exception as exc:
            if is_out_of_memory(exc):
                raise BatchOutOfMemoryError(
                    f"out of memory evaluating {desc} on {device} with batch size {batch_size}; lower it with "
                    f"--batch-size {max(1, batch_size // 2)} (evaluate.batch_size in params.yaml). Accuracy does "
                    "not depend on the batch size."
                ) from exc
            raise
        logits = scale * F.normalize(features.float(), dim=-1) @ head.float().t()
        if projection is not None:
            pred = projection.to_full_labels(projection.project_logits(logits).argmax(-1))
        else:
            pred = logits.argmax(-1)
        correct += int((pred.cpu() == labels).sum())
        n += int(labels.numel())
        bar.set_postfix(top1=f"{correct / n:.3f}")
    model.train(was_training)
    return Accuracy(correct, n)
