"""The text side of one training step: class embeddings in, their share of the backward out.

Memory must not grow with the class count beyond one chunk of prompts, whatever trains:

* nothing in the text tower trains: the class embeddings are encoded once and reused;
* it trains and the prompts fit one chunk (``text_batch``): they are encoded once per
  step in one graph, the step's micro-batches collect dL/dT on a leaf, and that graph is
  back-propagated once at the end of the step;
* it trains and there are more prompts: they are encoded without a graph, the
  micro-batches collect dL/dT, and the text tower is then re-encoded and back-propagated
  chunk by chunk (:func:`saft.sparse.objective.backward_classes`).

Either way the text tower runs once (twice with recomputation) per step rather than once
per micro-batch, and gradients equal those of one graph over everything up to fp32 rounding.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
import torch.nn as nn

from saft.sparse.distributed import SINGLE, Dist
from saft.sparse.objective import ClassPrompts, backward_classes, class_embeddings, encode_classes


class StepTextSide:
    """Under ``dist`` every rank encodes the classes; dL/dT is summed over the ranks and each
    rank back-propagates it through its share of the classes, so the ranks' text gradients sum
    to the whole backward (the caller sums the trained tensors' gradients)."""

    def __init__(self, model: nn.Module, prompts: ClassPrompts, *, trains: bool, text_batch: int,
                 context: Callable[[], ContextManager] = contextlib.nullcontext, dist: Dist = SINGLE):
        self.model, self.prompts, self.trains = model, prompts, trains
        self.text_batch, self.context, self.dist = text_batch, context, dist
        self._fixed: torch.Tensor | None = None
        self._graph: torch.Tensor | None = None
        self._leaf: torch.Tensor | None = None

    def begin(self) -> torch.Tensor:
        """The class embeddings for this step's micro-batches (a leaf collecting dL/dT when the text trains)."""
        if not self.trains:
            if self._fixed is None:
                self._fixed = encode_classes(self.model, self.prompts, text_batch=self.text_batch,
                                             context=self.context)
            return self._fixed
        if self.prompts.n_prompts <= self.text_batch:
            with self.context():
                self._graph = class_embeddings(self.model, self.prompts)
            value = self._graph.detach().float()
        else:
            self._graph = None
            value = encode_classes(self.model, self.prompts, text_batch=self.text_batch, context=self.context)
        self._leaf = value.requires_grad_(True)
        return self._leaf

    def finish(self) -> None:
        """Back-propagate the step's collected dL/dT through the text tower."""
        leaf, graph = self._leaf, self._graph
        self._leaf = self._graph = None
        if leaf is None:
            return
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        dist = self.dist
        dist.all_reduce(grad)
        if graph is not None:
            if dist.active:  # this rank's classes only: the ranks' backwards add up to one
                keep = (torch.arange(grad.shape[0], device=grad.device) % dist.world == dist.rank)
                grad = grad * keep[:, None].to(grad.dtype)
            graph.backward(grad.to(graph.dtype))
        else:
            backward_classes(self.model, self.prompts, grad, text_batch=self.text_batch, context=self.context,
                             part=(dist.rank, dist.world))
