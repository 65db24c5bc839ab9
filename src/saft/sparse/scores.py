"""Phase I of SAFT: score every eligible parameter entry by its downstream-loss gradient.

Gradients are taken at the pre-trained weights and accumulated over the whole training
set in batches of any size. Per-batch gradients of the mean loss are weighted by batch
size, so ``abs_mean`` is exactly |mean gradient over all examples| however the data is
batched. ``mean_abs`` and ``mean_sq`` average |g| and g^2 of the per-batch gradients
(an ablation: they depend on the batch size; per-example gradients would cost a
backward pass per example).

The text tower is touched once per pass, not once per batch. The class embeddings T are
encoded once without a graph and enter every batch as a leaf; the image side's backward
gives each batch's dL/dT, whose batch-size-weighted sum over the pass is then
back-propagated through the text tower once, in chunks of classes
(:func:`saft.sparse.objective.backward_classes`). By linearity this is exactly the sum of
the per-batch text gradients, so ``abs_mean`` scores (and the mask) are those of a
per-batch full backward, at the cost of the image side plus one text forward and
backward. ``mean_abs``/``mean_sq`` are not linear in the per-batch gradient: for them
the text side is back-propagated per batch (chunked, so memory stays bounded).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from saft.progress import progress_bar

from saft.models.fingerprint import fingerprint_model
from saft.sparse.config import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, SCORE_RULES
from saft.sparse.distributed import SINGLE, Dist
from saft.sparse.objective import (DEFAULT_TEXT_BATCH, ClassPrompts, backward_classes, clip_logits, encode_classes,
                                   is_text_side)



@dataclass(frozen=True)
class Eligibility:
    """Which parameters may be selected, by fnmatch patterns over parameter names.

    Default: every parameter of both towers (embeddings, attention in-projections,
    patch embedding, LayerNorms, biases, projections) except the temperature.
    """

    include: Sequence[str] = DEFAULT_INCLUDE
    exclude: Sequence[str] = DEFAULT_EXCLUDE

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
    text_batch: int = DEFAULT_TEXT_BATCH,
    dist: Dist = SINGLE,
) -> Scores:
    """Accumulate downstream-loss gradients at the current (pre-trained) weights.

    ``batches`` yields ``(images, labels)``; a DataLoader over the training set is typical.
    Under ``dist`` (several processes) ``batches`` is this rank's share (e.g.
    ``dist.batches(loader)``) and the result, the same on every rank, covers all shares.
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
    # fp64 sums: a job of several processes adds the same batch and chunk terms in another
    # order; with fp32 sums the last bits, and so near-ties at the density's threshold, would
    # depend on the process count (4 more bytes per eligible entry, for the pass only).
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    text_params = {n: p for n, p in params.items() if is_text_side(n)}
    prompts = prompts.to(device)
    seen = 0

    def accumulate(names, weight: float) -> None:
        for name in names:
            p = params[name]
            if p.grad is None:  # parameter not on the loss path (e.g. unused head)
                continue
            g = p.grad.double()
            if rule == "abs_mean":
                acc[name].add_(g, alpha=weight)
            elif rule == "mean_abs":
                acc[name].add_(g.abs(), alpha=weight)
            else:
                acc[name].add_(g.square(), alpha=weight)
            p.grad = None

    try:
        class_emb = encode_classes(model, prompts, text_batch=text_batch)
        class_grad = torch.zeros_like(class_emb, dtype=torch.float64)  # sum over batches of n * dL/dT
        total = len(batches) if hasattr(batches, "__len__") else None
        for images, labels in _batch_iter(batches, progress and dist.is_main, total):
            images, labels = images.to(device), labels.to(device)
            n = labels.shape[0]
            leaf = class_emb.detach().requires_grad_(bool(text_params))
            loss = torch.nn.functional.cross_entropy(clip_logits(model, images, leaf).float(), labels)
            loss.backward()
            accumulate([name for name in params if name not in text_params], n)
            if text_params and leaf.grad is not None:
                if rule == "abs_mean":
                    class_grad.add_(leaf.grad, alpha=n)
                else:  # not linear in the gradient: this batch's text gradient is needed on its own
                    backward_classes(model, prompts, leaf.grad, text_batch=text_batch)
                    accumulate(text_params, n)
            seen += n
        seen = dist.sum_int(seen, device)
        if text_params and rule == "abs_mean" and seen:
            dist.all_reduce(class_grad)
            backward_classes(model, prompts, class_grad.float(), text_batch=text_batch, part=(dist.rank, dist.world),
                             after_chunk=lambda: accumulate(text_params, 1.0))
        for t in acc.values():
            dist.all_reduce(t)
    finally:
        for name, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved_flags[name])
        model.train(was_training)
    if seen == 0:
        raise ValueError("no training examples were seen: the data for scoring is empty")
    for t in acc.values():
        t.div_(seen)  # the same on every rank: seen and acc are sums over the job
        if rule == "abs_mean":
            t.abs_()
    meta = {"base_fingerprint": fingerprint_model(model), **prompts.meta()}
    if getattr(model, "saft_model_spec", None):
        meta["base_model"] = model.saft_model_spec
    return Scores({n: t.float() for n, t in acc.items()}, rule, seen, meta)
