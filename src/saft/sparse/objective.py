"""The downstream objective SAFT scores and trains with, and its text side at any class count.

CLIP-style classification: cross-entropy over ``logit_scale * cos(image, class_text)``,
where each class's text embedding is the renormalised mean of its prompt embeddings
over the templates (the zero-shot ensemble of CLIP).

The text side is what grows with the task: ImageNet has 1000 classes, and running all
their prompts through the text tower with autograd in one graph holds activations for
every prompt. The loss depends on the text tower only through the class embeddings
``T`` [n_classes, dim], so the gradient splits exactly (chain rule):
``dL/dtheta_text = (dL/dT) . dT/dtheta_text``. The functions here use that:

* :func:`encode_classes` computes ``T`` without a graph, ``text_batch`` prompts at a time;
* the image side then runs with ``T`` as a leaf, which collects ``dL/dT`` (summed over
  as many batches as wanted: a scoring pass, or a step's micro-batches);
* :func:`backward_classes` re-encodes the classes chunk by chunk with a graph and
  back-propagates ``dL/dT`` through each chunk, so at most ``text_batch`` prompts' activations
  are alive at any time.

Every encoding is cut to its prompts' longest token sequence (:mod:`saft.models.text`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from saft.models.text import encode_text
from saft.progress import progress_bar
from saft.sparse.config import AUTO_TEXT_BATCH, auto_text_batch  # noqa: F401 (part of this module's API)

DEFAULT_TEMPLATES = ("a photo of a {}.",)
DEFAULT_TEXT_BATCH = 256
"""Prompts encoded at once when the text side is chunked and no image batch size is known."""

_IMAGE_PREFIXES = ("visual.",)
_HEAD_PARAMS = ("logit_scale", "logit_bias")


@dataclass(frozen=True)
class ClassPrompts:
    """Tokenized prompts, ``tokens[c * n_templates + t]`` is class c under template t."""

    tokens: torch.Tensor
    n_classes: int
    n_templates: int
    templates: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()  # what a trained head's rows are named by (LP-FT)

    @classmethod
    def build(
        cls,
        tokenizer: Callable[[list[str]], torch.Tensor],
        class_names: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
    ) -> "ClassPrompts":
        if not class_names:
            raise ValueError("class_names is empty: at least one class is needed")
        if not templates:
            raise ValueError("templates is empty: at least one prompt template is needed")
        for template in templates:
            if "{}" not in template:
                raise ValueError(f"prompt template {template!r} has no '{{}}' for the class name")
        texts = [t.format(name) for name in class_names for t in templates]
        return cls(tokenizer(texts), len(class_names), len(templates), tuple(templates), tuple(class_names))

    def to(self, device: torch.device | str) -> "ClassPrompts":
        return ClassPrompts(self.tokens.to(device), self.n_classes, self.n_templates, self.templates,
                            self.class_names)

    @property
    def n_prompts(self) -> int:
        return self.n_classes * self.n_templates

    def meta(self) -> dict[str, str]:
        """What masks and deltas record about the prompts they were made with."""
        return {"prompt_templates": json.dumps(list(self.templates)), "prompt_classes": str(self.n_classes)}


def is_text_side(name: str) -> bool:
    """Whether a parameter reaches the loss through the class embeddings (not the image tower or the scale)."""
    return not name.startswith(_IMAGE_PREFIXES) and name not in _HEAD_PARAMS


def _chunk_embeddings(model: nn.Module, prompts: ClassPrompts, start: int, stop: int) -> torch.Tensor:
    t = prompts.n_templates
    text = F.normalize(encode_text(model, prompts.tokens[start * t:stop * t]).float(), dim=-1)
    text = text.reshape(stop - start, t, -1).mean(dim=1)
    return F.normalize(text, dim=-1)


def _class_chunks(prompts: ClassPrompts, text_batch: int) -> list[tuple[int, int]]:
    per_chunk = max(1, text_batch // prompts.n_templates)
    return [(s, min(s + per_chunk, prompts.n_classes)) for s in range(0, prompts.n_classes, per_chunk)]


def class_embeddings(model: nn.Module, prompts: ClassPrompts) -> torch.Tensor:
    """Unit-norm class embeddings [n_classes, dim] in one graph, differentiable through the text tower."""
    return _chunk_embeddings(model, prompts, 0, prompts.n_classes)


def encode_classes(model: nn.Module, prompts: ClassPrompts, *, text_batch: int = DEFAULT_TEXT_BATCH,
                   context: Callable[[], ContextManager] = contextlib.nullcontext, progress: bool = False,
                   desc: str = "text") -> torch.Tensor:
    """The class embeddings without a graph, ``text_batch`` prompts at a time (each chunk under ``context()``)."""
    rows = []
    chunks = _class_chunks(prompts, text_batch)
    with torch.no_grad():
        for start, stop in progress_bar(chunks, enabled=progress, desc=desc, unit="chunk"):
            with context():
                rows.append(_chunk_embeddings(model, prompts, start, stop).float())
    return torch.cat(rows)


def backward_classes(model: nn.Module, prompts: ClassPrompts, grad: torch.Tensor, *,
                     text_batch: int = DEFAULT_TEXT_BATCH,
                     context: Callable[[], ContextManager] = contextlib.nullcontext,
                     part: tuple[int, int] = (0, 1),
                     after_chunk: Callable[[], None] | None = None) -> None:
    """Back-propagate ``grad`` = dL/dT through the text tower, re-encoding one chunk of classes at a time.

    Parameter gradients accumulate into ``.grad`` as one backward over all classes would
    leave them. ``context()`` is entered per chunk (e.g. a sparse update's attachment and
    autocast), so every chunk builds and frees its own graph. ``part=(rank, world)`` takes
    every ``world``-th chunk only: the ranks of a job then share the work, and the sum of
    their gradients is the whole backward. ``after_chunk()`` runs after each chunk's backward
    (the scorer moves ``.grad`` into its accumulators there, so their sum does not depend on
    which rank back-propagated which chunk).
    """
    rank, world = part
    for i, (start, stop) in enumerate(_class_chunks(prompts, text_batch)):
        if i % world != rank:
            continue
        with context():
            emb = _chunk_embeddings(model, prompts, start, stop)
        emb.backward(grad[start:stop].to(emb.dtype))
        if after_chunk is not None:
            after_chunk()


def clip_logits(model: nn.Module, images: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    image = F.normalize(model.encode_image(images), dim=-1)
    scale = model.logit_scale.exp() if hasattr(model, "logit_scale") else 100.0
    return scale * image @ class_emb.to(image.dtype).t()


def classification_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    prompts: ClassPrompts,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of a batch and its logits, text encoded in the same graph (small class counts)."""
    logits = clip_logits(model, images, class_embeddings(model, prompts))
    return F.cross_entropy(logits.float(), labels), logits
