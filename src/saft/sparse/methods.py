"""What each fine-tuning method trains, one class per method; the trainer's loop is shared by all.

A :class:`Training` is one method set up on a model for one run: the trainable tensors
(in a fixed order: checkpoints store them so), whether the text tower trains, what wraps
every forward, the classifier's head, and the delta it leaves. :meth:`Training.close`
gives the model back exactly as it came in (whatever happened), after keeping what the
delta needs. Definitions and sources: docs/methods.md.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
import torch.nn as nn

from saft.sparse.config import FinetuneConfig
from saft.sparse.delta import Delta, delta_from_dense, delta_from_sparse
from saft.sparse.mask import Mask
from saft.sparse.objective import ClassPrompts, is_text_side
from saft.sparse.scores import Eligibility


class Training:
    params: list[torch.Tensor]
    text_trains: bool
    updates_norm_statistics = False  # BatchNorm running statistics (none in a ViT) follow the data only when the
    # whole network trains

    def attached(self) -> ContextManager:
        """Entered around every forward of the run."""
        return contextlib.nullcontext()

    def head(self, class_emb: torch.Tensor) -> torch.Tensor:
        """The classifier's class embeddings for this step, from the text tower's."""
        return class_emb

    def close(self) -> None:
        """Keep what the delta needs, then leave the model as it was given."""

    def delta(self, base_fingerprint: str, meta: dict[str, str]) -> Delta:
        raise NotImplementedError


class MaskTraining(Training):
    """saft and random: the values of a mask's entries (a :class:`~saft.sparse.update.SparseUpdate`)."""

    def __init__(self, model: nn.Module, mask: Mask, device: torch.device):
        from saft.sparse.update import SparseUpdate

        self.model, self.update = model, SparseUpdate(mask, device=device)
        self.params = list(self.update.values)
        self.text_trains = any(is_text_side(n) for n in self.update.names)

    def attached(self) -> ContextManager:
        return self.update.attached(self.model)

    def delta(self, base_fingerprint: str, meta: dict[str, str]) -> Delta:
        return delta_from_sparse(self.update, base_fingerprint, meta)


class FullTraining(Training):
    """full: every eligible parameter (``include``/``exclude``), trained in place and restored afterwards."""

    updates_norm_statistics = True

    def __init__(self, model: nn.Module, eligibility: Eligibility):
        trainable = list(eligibility.select(model).items())
        self.named = trainable
        self.backup = {n: p.detach().clone() for n, p in trainable}
        for _, p in trainable:
            p.requires_grad_(True)
        self.params = [p for _, p in trainable]
        self.text_trains = any(is_text_side(n) for n, _ in trainable)
        self.trained: dict[str, torch.Tensor] = {}

    def close(self) -> None:
        self.trained = {n: p.detach().clone() for n, p in self.named}
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(self.backup[n])

    def delta(self, base_fingerprint: str, meta: dict[str, str]) -> Delta:
        return delta_from_dense(self.backup, self.trained, base_fingerprint, meta)


class LpftTraining(FullTraining):
    """lpft: the linear probe's head offsets (:mod:`saft.sparse.lpft`), then full fine-tuning with them."""

    def __init__(self, model: nn.Module, eligibility: Eligibility, offsets: torch.Tensor, class_names, summary: dict):
        super().__init__(model, eligibility)
        self.offsets = nn.Parameter(offsets.clone())
        self.params.append(self.offsets)
        self.class_names, self.summary = tuple(class_names), summary

    def head(self, class_emb: torch.Tensor) -> torch.Tensor:
        return class_emb + self.offsets.to(class_emb.dtype)

    def delta(self, base_fingerprint: str, meta: dict[str, str]) -> Delta:
        delta = super().delta(base_fingerprint, {**meta, **{k: repr(v) for k, v in self.summary.items()}})
        delta.head, delta.head_classes = self.offsets.detach().cpu().clone(), self.class_names
        return delta


class LoraTraining(Training):
    """lora: PEFT adapters on ``lora_targets`` (:mod:`saft.sparse.lora`), unloaded at the end."""

    def __init__(self, model: nn.Module, cfg: FinetuneConfig):
        from saft.sparse.lora import lora_adapters

        self.model, self.stack = model, contextlib.ExitStack()
        self.params = self.stack.enter_context(lora_adapters(model, cfg, seed=cfg.seed))
        names = [n for n, p in model.named_parameters() if "lora_" in n]
        self.text_trains = any(is_text_side(n) for n in names)
        self.rank, self.alpha = cfg.lora_rank, cfg.lora_alpha
        self.factors: Delta | None = None

    def close(self) -> None:
        from saft.sparse.lora import lora_delta

        try:
            self.factors = lora_delta(self.model, "")
        finally:
            self.stack.close()

    def delta(self, base_fingerprint: str, meta: dict[str, str]) -> Delta:
        return Delta({}, {}, base_fingerprint, {**meta, "lora_rank": str(self.rank), "lora_alpha": repr(self.alpha)},
                     self.factors.factors)


def start_training(cfg: FinetuneConfig, model: nn.Module, *, mask: Mask | None, device: torch.device,
                   dataset=None, prompts: ClassPrompts | None = None, amp_dtype: torch.dtype | None = None,
                   loader_kwargs: Callable[[], dict] | None = None) -> Training:
    """Set ``cfg.method`` up on ``model`` (every parameter's ``requires_grad`` off beforehand)."""
    if cfg.needs_mask:
        if mask is None:
            raise ValueError(f"method {cfg.method!r} trains a mask: pass mask=select_mask(...) or random_mask(...)")
        return MaskTraining(model, mask, device)
    if mask is not None:
        raise ValueError(f"method {cfg.method!r} trains no mask: drop the mask, or use method saft or random")
    eligibility = Eligibility(cfg.include, cfg.exclude)
    if cfg.method == "full":
        return FullTraining(model, eligibility)
    if cfg.method == "lora":
        return LoraTraining(model, cfg)
    if cfg.method == "lpft":
        from saft.sparse.lpft import linear_probe

        if prompts is None or dataset is None:
            raise ValueError("method lpft trains a linear probe first: it needs the training set and the prompts")
        if len(prompts.class_names) != prompts.n_classes:
            raise ValueError("method lpft names its head's rows by class: build the prompts with "
                             "ClassPrompts.build(tokenizer, class_names, templates)")
        offsets, summary = linear_probe(model, dataset, prompts, cfg, device=device, amp_dtype=amp_dtype,
                                        loader_kwargs=loader_kwargs() if loader_kwargs else None)
        return LpftTraining(model, eligibility, offsets.to(device), prompts.class_names, summary)
    raise ValueError(f"unknown method {cfg.method!r}")


__all__ = ["FullTraining", "LoraTraining", "LpftTraining", "MaskTraining", "Training", "start_training"]
