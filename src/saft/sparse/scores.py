"""Phase I of SAFT: score every eligible parameter entry by its downstream-loss gradient.

Gradients are taken at the pre-trained weights and accumulated over the whole training
set in batches of any size. Per-batch gradients of the mean loss are weighted by batch
size, so ``abs_mean`` is exactly |mean gradient over all examples| however the data is
batched. ``mean_abs`` and ``mean_sq`` average |g| and g^2 of the per-batch gradients
(an ablation: they depend on the batch size; per-example gradients would cost a
backward pass per example).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from saft.progress import progress_bar

from saft.models.fingerprint import fingerprint_model
from saft.sparse.objective import ClassPrompts, classification_loss

SCORE_RULES = ("abs_mean", "mean_abs", "mean_sq")


@dataclass(frozen=True)
class Eligibility:
    """Which parameters may be selected, by fnmatch patterns over parameter names.

    Default: every parameter of both towers (embeddings, attention in-projections,
    patch embedding, LayerNorms, biases, projections) except the temperature.
    """

    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ("logit_scale", "logit_bias")

    def allows(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude
        )

    def select(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        chosen = {n: p for n, p in model.named_parameters() if self.allows(n)}
        if not chosen:
            raise ValueError(
                f"no parameter matches include={list(self.include)} exclude={list(self.exclude)}"
            )
        return chosen


@dataclass
class Scores:
    """Per-parameter score tensors (same shapes as the parameters) and how they were made."""

    values: dict[str, torch.Tensor]
    rule: str
    num_examples: int
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def eligible_count(self) -> int:
        return sum(v.numel() for v in self.values.values())


def _batch_iter(batches: Iterable, progress: bool, total: int | None):
    return progress_bar(batches, enabled=progress, desc="scoring", unit="batch", total=total)


def importance_scores(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    prompts: ClassPrompts,
    *,
    rule: str = "abs_mean",
    eligibility: Eligibility | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Scores:
    """Accumulate downstream-loss gradients at the current (pre-trained) weights.

    ``batches`` yields ``(images, labels)``; a DataLoader over the training set is typical.
    The model's weights and ``requires_grad`` flags are left as they were.
    """
    if rule not in SCORE_RULES:
        raise ValueError(f"unknown score rule {rule!r}; choose one of {', '.join(SCORE_RULES)}")
    eligibility = eligibility or Eligibility()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    params = eligibility.select(model)
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    for name, p in model.named_parameters():
        p.requires_grad_(name in params)
    model.eval()  # scores are taken at the pre-trained function: no dropout, frozen norms
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    prompts = prompts.to(device)
    seen = 0
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        for images, labels in _batch_iter(batches, progress, total):
            images, labels = images.to(device), labels.to(device)
            n = labels.shape[0]
            for p in params.values():
                p.grad = None
            loss, _ = classification_loss(model, images, labels, prompts)
            loss.backward()
            for name, p in params.items():
                if p.grad is None:  # parameter not on the loss path (e.g. unused head)
                    continue
                g = p.grad.float()
                if rule == "abs_mean":
                    acc[name].add_(g, alpha=n)
                elif rule == "mean_abs":
                    acc[name].add_(g.abs(), alpha=n)
                else:
                    acc[name].add_(g.square(), alpha=n)
            seen += n
    finally:
        for name, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved_flags[name])
        model.train(was_training)
    if seen == 0:
        raise ValueError("no training examples were seen: the data for scoring is empty")
    for t in acc.values():
        t.div_(seen)
        if rule == "abs_mean":
            t.abs_()
    meta = {"base_fingerprint": fingerprint_model(model)}
    if getattr(model, "saft_model_spec", None):
        meta["base_model"] = model.saft_model_spec
    return Scores(acc, rule, seen, meta)
