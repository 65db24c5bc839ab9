"""LP-FT's first stage: a linear probe on the frozen features, initialised at the zero-shot head.

Kumar et al. 2022 ("Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022) show that fine-tuning the whole network from a poor
head distorts the pre-trained features while the head catches up, which costs OOD
accuracy; training the linear head first on the frozen features (a linear probe), then
fine-tuning everything from that head (LP-FT), keeps the features closer to the
pre-trained ones. For a CLIP zero-shot classifier this module makes that precise:

* the classifier is CLIP's: ``logits = s * normalize(f(x)) @ (T + D).T``, with ``s`` the
  model's logit scale, ``T`` the zero-shot class embeddings (unit rows, the text tower on
  the training prompts) and ``D`` a per-class offset; ``W = T + D`` is the linear head;
* the probe (stage 1) trains ``D`` alone from ``D = 0``, i.e. the head ``W`` from the
  zero-shot head, on the image features of the training set computed once by the frozen
  image tower: full-batch AdamW for ``probe_steps`` steps at ``probe_lr``, with the run's
  weight decay, which on ``D`` pulls ``W`` back toward the zero-shot head (the L2
  regularisation of the paper's logistic-regression probe, centred on ``T``); neither
  tower is touched;
* full fine-tuning (stage 2, :mod:`saft.sparse.trainer`) then trains every eligible
  parameter, as method ``full`` does, and ``D`` with them, from the probe's ``D``, with
  ``T`` recomputed from the training text tower at every step.

The delta holds the weights' differences and ``D`` (rows named by class), and whoever
builds a head adds ``alpha * D`` to the class embeddings it encodes
(:meth:`saft.sparse.delta.Delta.head_offsets`), so ``alpha = 0`` is exactly zero-shot and
a class the probe never saw (a "new" class of base-to-new) keeps its zero-shot embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from saft.sparse.config import FinetuneConfig
from saft.sparse.objective import ClassPrompts, auto_text_batch, encode_classes


@torch.no_grad()
def image_features(model: nn.Module, dataset: Dataset, *, batch_size: int, device: torch.device,
                   amp_dtype: torch.dtype | None = None, loader_kwargs: dict | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image features [n, dim] (fp32) and labels of every image of ``dataset``, in order."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, **(loader_kwargs or {})):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                f = model.encode_image(images.to(device, non_blocking=True))
            feats.append(F.normalize(f.float(), dim=-1))
            labels.append(y.to(device))
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def train_probe(features: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor, scale: float,
                cfg: FinetuneConfig) -> tuple[torch.Tensor, dict]:
    """The probe's offsets ``D`` (same shape as ``class_emb``) and a summary of its training.

    Full-batch AdamW on the cross-entropy of ``scale * features @ (class_emb + D).T``
    from ``D = 0``, ``cfg.probe_steps`` steps at ``cfg.probe_lr`` (constant), betas and
    weight decay of ``cfg``. Deterministic: no sampling.
    """
    offsets = torch.zeros_like(class_emb, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.AdamW([offsets], lr=cfg.probe_lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    base = class_emb.detach().float()

    def loss_and_acc():
        logits = scale * features @ (base + offsets).t()
        return F.cross_entropy(logits, labels), float((logits.argmax(-1) == labels).float().mean())

    with torch.no_grad():
        start_loss, start_acc = loss_and_acc()
    for step in range(cfg.probe_steps):
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_and_acc()
        if not math.isfinite(float(loss.detach())):
            raise ValueError(f"lpft: the linear probe diverged at step {step + 1} (loss {float(loss)}); lower "
                             f"--probe-lr (now {cfg.probe_lr:g})")
        loss.backward()
        opt.step()
    with torch.no_grad():
        end_loss, end_acc = loss_and_acc()
    summary = {"probe_steps": cfg.probe_steps, "probe_lr": cfg.probe_lr, "probe_loss_start": float(start_loss),
               "probe_loss_end": float(end_loss), "probe_train_acc_start": start_acc, "probe_train_acc_end": end_acc,
               "probe_offset_norm": float(offsets.detach().norm())}
    return offsets.detach(), summary


def linear_probe(model: nn.Module, dataset: Dataset, prompts: ClassPrompts, cfg: FinetuneConfig, *,
                 device: torch.device, amp_dtype: torch.dtype | None = None, loader_kwargs: dict | None = None
                 ) -> tuple[torch.Tensor, dict]:
    """Stage 1 of LP-FT on ``model`` as it is (read only): the head offsets ``D`` [n_classes, dim] and a summary."""
    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    was_training = model.training
    model.eval()
    try:
        class_emb = encode_classes(model, prompts.to(device), text_batch=auto_text_batch(cfg.text_batch,
                                                                                          cfg.batch_size),
                                   context=autocast)
    finally:
        model.train(was_training)
    features, labels = image_features(model, dataset, batch_size=cfg.batch_size, device=device, amp_dtype=amp_dtype,
                                      loader_kwargs=loader_kwargs)
    scale = float(model.logit_scale.detach().exp()) if hasattr(model, "logit_scale") else 100.0
    with torch.enable_grad():
        return train_probe(features, labels, class_emb.float(), scale, cfg)


__all__ = ["image_features", "linear_probe", "train_probe"]
