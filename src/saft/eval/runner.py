"""Stream a dataset through the image tower and score it against a zero-shot head."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from saft.loader import LoaderOptions
from saft.progress import progress_bar
from saft.sparse.distributed import SINGLE, Dist
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


@dataclass(frozen=True)
class Variant:
    """One model to score: ``merged()`` puts its weights in place for a block (the base: a no-op)."""

    head: torch.Tensor
    merged: Callable[[], ContextManager] = contextlib.nullcontext
    label: str = ""


@torch.inference_mode()
def evaluate_variants(
    model: torch.nn.Module,
    variants: Sequence[Variant],
    dataset: Dataset,
    *,
    subset: Sequence[int] | None = None,
    batch_size: int = 128,
    loader: LoaderOptions = LoaderOptions(),
    device: str | torch.device | None = None,
    progress: bool = False,
    desc: str = "evaluating",
    dist: Dist = SINGLE,
) -> list[Accuracy]:
    """Top-1 of ``dataset`` for every variant, decoding each batch once.

    The zero-shot model, each delta and each alpha read the same images: each batch is
    decoded (in loader workers), moved to the device once, and every variant's weights
    are merged in turn to score it. Merging a sparse delta touches its k entries only.
    Under ``dist`` each rank reads every ``world``-th batch and the counts are summed, so
    every rank returns the single-process counts.
    """
    if len(dataset) == 0:
        raise ValueError(f"{desc}: the dataset is empty")
    if not variants:
        raise ValueError(f"{desc}: no model variant to evaluate")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    projection = SubsetProjection(tuple(subset)) if subset is not None else None
    was_training = model.training
    model.eval()
    heads = [v.head.to(device).float() for v in variants]
    scale = model.logit_scale.exp() if hasattr(model, "logit_scale") else 100.0
    batches = [list(range(s, min(s + batch_size, len(dataset)))) for s in range(0, len(dataset), batch_size)]
    data = DataLoader(dataset, batch_sampler=list(dist.batches(batches)), **loader.kwargs(device))
    correct, n = [0] * len(variants), 0
    bar = progress_bar(data, enabled=progress and dist.is_main, desc=desc, unit="batch")
    try:
        for images, labels in bar:
            images = images.to(device, non_blocking=True)
            for i, (variant, head) in enumerate(zip(variants, heads)):
                try:
                    with variant.merged(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                          enabled=device.type == "cuda"):
                        features = model.encode_image(images)
                except Exception as exc:
                    if is_out_of_memory(exc):
                        raise BatchOutOfMemoryError(
                            f"out of memory evaluating {desc} on {device} with batch size {batch_size}; lower it "
                            f"with --batch-size {max(1, batch_size // 2)} (evaluate.batch_size in params.yaml). "
                            "Accuracy does not depend on the batch size."
                        ) from exc
                    raise
                logits = scale * F.normalize(features.float(), dim=-1) @ head.t()
                if projection is not None:
                    pred = projection.to_full_labels(projection.project_logits(logits).argmax(-1))
                else:
                    pred = logits.argmax(-1)
                correct[i] += int((pred.cpu() == labels).sum())
            n += int(labels.numel())
            bar.set_postfix(top1=f"{correct[0] / n:.3f}")
    finally:
        model.train(was_training)
    if dist.active:
        counts = dist.all_reduce(torch.tensor([*correct, n], dtype=torch.int64, device=dist.comm_device(device)))
        correct, n = [int(c) for c in counts[:-1]], int(counts[-1])
    return [Accuracy(c, n) for c in correct]


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
    return evaluate_variants(model, [Variant(head)], dataset, subset=subset, batch_size=batch_size,
                             loader=LoaderOptions(num_workers), device=device, progress=progress, desc=desc)[0]
