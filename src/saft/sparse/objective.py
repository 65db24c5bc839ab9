"""The downstream objective SAFT scores and trains with.

CLIP-style classification: cross-entropy over ``logit_scale * cos(image, class_text)``,
where each class's text embedding is the renormalised mean of its prompt embeddings
over the templates (the zero-shot ensemble of CLIP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass(frozen=True)
class ClassPrompts:
    """Tokenized prompts, ``tokens[c * n_templates + t]`` is class c under template t."""

    tokens: torch.Tensor
    n_classes: int
    n_templates: int

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
        return cls(tokenizer(texts), len(class_names), len(templates))

    def to(self, device: torch.device | str) -> "ClassPrompts":
        return ClassPrompts(self.tokens.to(device), self.n_classes, self.n_templates)


def class_embeddings(model: torch.nn.Module, prompts: ClassPrompts) -> torch.Tensor:
    """Unit-norm class embeddings [n_classes, dim]; differentiable through the text tower."""
    text = F.normalize(model.encode_text(prompts.tokens), dim=-1)
    text = text.reshape(prompts.n_classes, prompts.n_templates, -1).mean(dim=1)
    return F.normalize(text, dim=-1)


def clip_logits(model: torch.nn.Module, images: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    image = F.normalize(model.encode_image(images), dim=-1)
    scale = model.logit_scale.exp() if hasattr(model, "logit_scale") else 100.0
    return scale * image @ class_emb.to(image.dtype).t()


def classification_loss(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    prompts: ClassPrompts,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of a batch and its logits (text re-encoded: the text tower may train)."""
    logits = clip_logits(model, images, class_embeddings(model, prompts))
    return F.cross_entropy(logits.float(), labels), logits
