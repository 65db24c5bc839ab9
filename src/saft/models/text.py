"""Text encoding cut to the longest prompt: the same embeddings at a fraction of the cost.

CLIP pads every prompt to its context length (77 tokens for the BPE tokenizer), but a
prompt like "a photo of a goldfish." is 8 tokens. Under the causal attention mask a
position only attends to the ones before it, and the embedding is read at one position
(the end-of-text token for ``argmax``/``eos`` pooling, the first token for ``first``), so
every position after the last pooled one can be dropped without changing the result:
the transformer runs on ``L = max(pool position) + 1`` tokens with the causal mask and
positional embedding cut to ``L``. Outputs equal the full-length encoding up to fp32
rounding (the matrix products see other shapes); tests state the tolerance.

Where the cut would not be exact (no causal mask, ``last`` pooling, a class token, a
padding mask, or a Hugging Face text tower) the model's own ``encode_text`` runs on the
full tokens.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

_CUTTABLE_POOLS = ("argmax", "eos", "first")


def _text_module(model: nn.Module) -> tuple[nn.Module, str, int | None] | None:
    """The module holding the causal text transformer, its pool type and end-of-text id."""
    if hasattr(model, "text_pool_type") and hasattr(model, "positional_embedding") and hasattr(model, "transformer"):
        return model, model.text_pool_type, getattr(model, "text_eos_id", None)
    text = getattr(model, "text", None)
    if text is not None and type(text).__name__ == "TextTransformer":
        if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
            return None
        return text, text.pool_type, getattr(text, "eos_id", None)
    return None


def exact_length(model: nn.Module, tokens: torch.Tensor) -> int | None:
    """The shortest length ``tokens`` can be cut to with unchanged embeddings; None if no cut is exact."""
    found = _text_module(model)
    if found is None:
        return None
    module, pool, eos_id = found
    if getattr(module, "attn_mask", None) is None or pool not in _CUTTABLE_POOLS:
        return None
    if tokens.numel() == 0:
        return None
    if pool == "first":
        return 1
    if pool == "argmax":
        position = tokens.argmax(dim=-1)
    else:
        if eos_id is None:
            return None
        position = (tokens == eos_id).int().argmax(dim=-1)
    return int(position.max()) + 1


@contextlib.contextmanager
def _cut(module: nn.Module, length: int):
    """Shadow the causal mask and positional embedding with their first ``length`` positions.

    The values read are whatever the module currently computes with (a sparse update may
    shadow the positional embedding with base + values), so gradients still reach them.
    """
    saved = {name: module.__dict__.get(name) for name in ("attn_mask", "positional_embedding")}
    mask = module.attn_mask
    pos = module.positional_embedding
    module.__dict__["attn_mask"] = mask[:length, :length]
    module.__dict__["positional_embedding"] = pos[:length]
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)``, run on the exact cut of the tokens when one exists."""
    length = exact_length(model, tokens)
    if length is None or length >= tokens.shape[-1]:
        return model.encode_text(tokens)
    module = _text_module(model)[0]
    with _cut(module, length):
        return model.encode_text(tokens[:, :length])
