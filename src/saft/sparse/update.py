"""Phase II of SAFT: a frozen base model plus trainable values at the masked entries.

``SparseUpdate`` owns, for each tensor with selected entries, a k-long trainable values
vector and its index buffer. While attached (``with update.attached(model): ...``) the
model computes with W + scatter(values):

* Linear layers, attention in/out projections (self-attention) and the patch embedding
  (a Conv2d with stride == kernel) run through kernels that form only the selected
  entries' gradients; a token embedding adds a lookup in a table of its selected rows
  (no dense copy of the 25-49M-entry matrix, no dense gradient);
* every other selected tensor (embeddings, LayerNorms, projections used with ``@``,
  other convolutions) is shadowed by its effective dense value for the duration.

Tensors without selected entries stay plain frozen parameters: no weight gradient is
ever computed for them, and no optimizer state exists for them.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from saft.sparse.kernels import patchify, scatter_values, sparse_embedding, sparse_linear
from saft.sparse.mask import Mask
from saft.sparse.value_grad import EntryLayout

_MHA_PARAMS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
# Modules that read their Linear children's tensors directly instead of calling them
# (e.g. open_clip's ResNet attention pool feeds q/k/v/c_proj weights to the stock
# attention function). A patched forward of such a child would never run.
_WEIGHT_READERS = ("AttentionPool2d",)


def _is_patch_conv(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and m.kernel_size[0] == m.kernel_size[1] == m.stride[0] == m.stride[1]
        and m.padding in ((0, 0), 0, "valid")
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
    )


def _is_plain_embedding(m: nn.Module) -> bool:
    # max_norm renormalises rows in the forward; padding_idx changes the weight gradient
    return isinstance(m, nn.Embedding) and m.max_norm is None and m.padding_idx is None


class SparseUpdate(nn.Module):
    """Trainable sparse values for a mask, and the means to run a model with them."""

    def __init__(self, mask: Mask, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.names = sorted(n for n, i in mask.indices.items() if i.numel())
        self.shapes = {n: tuple(mask.shapes[n]) for n in self.names}
        self.values = nn.ParameterList(
            nn.Parameter(torch.zeros(mask.indices[n].numel(), dtype=dtype, device=device)) for n in self.names
        )
        for i, n in enumerate(self.names):
            self.register_buffer(f"idx_{i}", mask.indices[n].to(device=device, dtype=torch.long), persistent=False)
        self.mask_meta = dict(mask.meta)
        self._layouts: dict[tuple[int, torch.device], EntryLayout] = {}
        self._effective: dict[tuple[int, torch.dtype | None], tuple[tuple, torch.Tensor]] = {}

    def index(self, name: str) -> torch.Tensor:
        return getattr(self, f"idx_{self.names.index(name)}")

    def value(self, name: str) -> torch.Tensor:
        return self.values[self.names.index(name)]

    def items(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        for i, n in enumerate(self.names):
            yield n, getattr(self, f"idx_{i}"), self.values[i]

    def layout(self, i: int, out_features: int, in_features: int) -> EntryLayout:
        """Tensor ``i``'s entries as rows and columns of an [out, in] matrix, derived once per device."""
        idx = getattr(self, f"idx_{i}")
        key = (i, idx.device)
        if key not in self._layouts:
            self._layouts[key] = EntryLayout(idx, out_features, in_features)
        return self._layouts[key]

    def effective_weight(self, i: int, base: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scatter_values(base, idx_i, values_i, dtype=dtype)`` without a graph, reused while nothing changed.

        A step that encodes the text side in chunks runs every layer's forward once per chunk
        (twice with the recompute): the effective weight is built once per step instead of
        once per chunk. It is rebuilt when the values or the base change (an optimizer step or
        any in-place write bumps their version) and holds one copy of each patched tensor.
        """
        values, idx = self.values[i], getattr(self, f"idx_{i}")
        stamp = (values._version, values.data_ptr(), base._version, base.data_ptr(), idx.data_ptr())
        cached = self._effective.get((i, dtype))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        self._effective.pop((i, dtype), None)  # free the stale copy before building the new one
        with torch.no_grad():
            weight = scatter_values(base, idx, values, dtype=dtype)
        self._effective[(i, dtype)] = (stamp, weight)
        return weight

    def num_values(self) -> int:
        return sum(v.numel() for v in self.values)

    # -- attaching -------------------------------------------------------------------------

    def _plan(self, model: nn.Module) -> tuple[dict[nn.Module, dict[str, int]], list[tuple[nn.Module, str, int]]]:
        """Split the selected tensors into module patches (fast kernels) and shadows."""
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        patches: dict[nn.Module, dict[str, int]] = {}
        shadows: list[tuple[nn.Module, str, int]] = []
        for i, name in enumerate(self.names):
            if name not in params:
                raise KeyError(f"mask tensor {name!r} is not a parameter of this model")
            if tuple(params[name].shape) != self.shapes[name]:
                raise ValueError(
                    f"mask tensor {name!r} has shape {self.shapes[name]} but the model's is "
                    f"{tuple(params[name].shape)}: the mask belongs to another architecture"
                )
            owner_name, _, leaf = name.rpartition(".")
            owner = modules[owner_name]
            grand_name, _, child = owner_name.rpartition(".")
            grand = modules.get(grand_name) if owner_name else None
            if isinstance(grand, nn.MultiheadAttention) and child == "out_proj":
                if grand._qkv_same_embed_dim:
                    patches.setdefault(grand, {})[f"out_proj.{leaf}"] = i
                else:  # the stock attention reads out_proj's tensors, never calls it
                    shadows.append((owner, leaf, i))
            elif isinstance(owner, nn.MultiheadAttention) and owner._qkv_same_embed_dim and leaf in _MHA_PARAMS:
                patches.setdefault(owner, {})[leaf] = i
            elif _is_plain_embedding(owner) and leaf == "weight":
                patches.setdefault(owner, {})[leaf] = i
            elif (isinstance(owner, nn.Linear) or _is_patch_conv(owner)) and leaf in ("weight", "bias") \
                    and type(grand).__name__ not in _WEIGHT_READERS and not isinstance(grand, nn.MultiheadAttention):
                patches.setdefault(owner, {})[leaf] = i
            else:
                shadows.append((owner, leaf, i))
        return patches, shadows

    @contextlib.contextmanager
    def attached(self, model: nn.Module):
        """Run ``model`` with base + sparse values inside this block (one forward graph each).

        Base parameters are frozen inside the block (their flags restored on exit), so a
        forward built here never computes a base weight gradient.
        """
        patches, shadows = self._plan(model)
        patched, shadowed = [], []
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            for module, leaf, i in shadows:
                base = getattr(module, leaf)
                module.__dict__[leaf] = scatter_values(base, getattr(self, f"idx_{i}"), self.values[i])
                shadowed.append((module, leaf))
            if any(p.is_cuda for p in model.parameters()):
                # On a GPU every self-attention runs through the path that turns a causal float
                # mask into is_causal (flash attention), not only the ones holding selected entries.
                for module in model.modules():
                    if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
                        patches.setdefault(module, {})
            for module, slots in patches.items():
                module.__dict__["forward"] = types.MethodType(_patched_forward(module, self, slots), module)
                patched.append(module)
            yield model
        finally:
            for module, leaf in shadowed:
                module.__dict__.pop(leaf, None)
            for module in patched:
                module.__dict__.pop("forward", None)
            for p, flag in flags:
                p.requires_grad_(flag)

    def effective_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The fine-tuned value of every selected tensor (base + values)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            return {n: scatter_values(params[n], idx, v) for n, idx, v in self.items()}


def _slot(update: SparseUpdate, slots: dict[str, int], key: str):
    i = slots.get(key)
    if i is None:
        return None, None
    return update.values[i], getattr(update, f"idx_{i}")


def _weight(update: SparseUpdate, slots: dict[str, int], key: str, weight: torch.Tensor) -> dict:
    """The keyword arguments of ``sparse_linear`` that reuse the tensor's layout and effective weight."""
    i = slots.get(key)
    if i is None:
        return {}
    return {"w_layout": update.layout(i, weight.shape[0], weight[0].numel()),
            "w_effective": lambda dtype: update.effective_weight(i, weight, dtype)}


def _patched_forward(module: nn.Module, update: SparseUpdate, slots: dict[str, int]):
    if isinstance(module, nn.MultiheadAttention):
        return _mha_forward(update, slots)
    if isinstance(module, nn.Embedding):
        def embedding_forward(self, tokens):
            wv, wi = _slot(update, slots, "weight")
            return sparse_embedding(tokens, self.weight, wv, wi)
        return embedding_forward
    if isinstance(module, nn.Linear):
        def linear_forward(self, x):
            wv, wi = _slot(update, slots, "weight")
            bv, bi = _slot(update, slots, "bias")
            return sparse_linear(x, self.weight, self.bias, wv, wi, bv, bi,
                                 **_weight(update, slots, "weight", self.weight))
        return linear_forward

    def patch_conv_forward(self, x):
        wv, wi = _slot(update, slots, "weight")
        bv, bi = _slot(update, slots, "bias")
        p = self.kernel_size[0]
        patches, gh, gw = patchify(x, p)
        w2 = self.weight.reshape(self.out_channels, -1)
        y = sparse_linear(patches, w2, self.bias, wv, wi, bv, bi, **_weight(update, slots, "weight", w2))
        return y.transpose(1, 2).reshape(x.shape[0], self.out_channels, gh, gw)
    return patch_conv_forward


def _effective(update: SparseUpdate, slots: dict[str, int], key: str, base):
    v, i = _slot(update, slots, key)
    return base if v is None else scatter_values(base, i, v)


def _mha_forward(update: SparseUpdate, slots: dict[str, int]):
    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        self_attention = query is key and key is value
        if not self_attention or need_weights or (self.dropout and self.training) or self.bias_k is not None \
                or self.add_zero_attn:
            return _mha_dense(self, update, slots, query, key, value, key_padding_mask, need_weights,
                              attn_mask, average_attn_weights, is_causal)
        x = query if self.batch_first else query.transpose(0, 1)
        bsz, seq, embed = x.shape
        heads, head_dim = self.num_heads, embed // self.num_heads
        wv, wi = _slot(update, slots, "in_proj_weight")
        bv, bi = _slot(update, slots, "in_proj_bias")
        qkv = sparse_linear(x, self.in_proj_weight, self.in_proj_bias, wv, wi, bv, bi,
                            **_weight(update, slots, "in_proj_weight", self.in_proj_weight))
        q, k, v = qkv.view(bsz, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if key_padding_mask is None and _is_causal_mask(self, attn_mask, seq):
            attn_mask, is_causal = None, True  # the same attention, and flash attention stays available
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype, bsz, heads, seq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        out = out.transpose(1, 2).reshape(bsz, seq, embed)
        ov, oi = _slot(update, slots, "out_proj.weight")
        obv, obi = _slot(update, slots, "out_proj.bias")
        out = sparse_linear(out, self.out_proj.weight, self.out_proj.bias, ov, oi, obv, obi,
                            **_weight(update, slots, "out_proj.weight", self.out_proj.weight))
        return (out if self.batch_first else out.transpose(0, 1)), None
    return forward


def _is_causal_mask(module: nn.Module, mask, seq: int) -> bool:
    """Whether ``mask`` is the additive (or boolean) causal mask of length ``seq``.

    open_clip's text tower passes its causal mask as a float tensor, which rules out the
    flash attention kernel; recognised, it becomes ``is_causal=True``. The answer is cached
    per mask storage on the module, so the check (a device sync) runs once per mask.
    """
    if mask is None or mask.dim() != 2 or tuple(mask.shape) != (seq, seq):
        return False
    key = (mask.data_ptr(), tuple(mask.shape), mask.stride(), mask.dtype)
    cache = module.__dict__.setdefault("_saft_causal_masks", {})
    if key not in cache:
        upper = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).triu(1)
        if mask.dtype == torch.bool:
            cache[key] = bool(torch.equal(mask, upper))
        else:
            cache[key] = bool(torch.isneginf(mask[upper]).all() and (mask[~upper] == 0).all())
    return cache[key]


def _merge_masks(attn_mask, key_padding_mask, dtype, bsz, heads, seq):
    """nn.MultiheadAttention masks (bool True = blocked, or additive) -> one additive mask."""
    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)
    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:  # [bsz * heads, L, S]
            mask = mask.view(bsz, heads, seq, seq)
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask).view(bsz, 1, 1, seq)
        mask = kpm if mask is None else mask + kpm
    return mask


def _mha_dense(self, update, slots, query, key, value, key_padding_mask, need_weights, attn_mask,
               average_attn_weights, is_causal):
    """General attention path: dense effective weights through the stock implementation."""
    batch_first = self.batch_first
    if batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    out, weights = F.multi_head_attention_forward(
        query, key, value, self.embed_dim, self.num_heads,
        _effective(update, slots, "in_proj_weight", self.in_proj_weight),
        _effective(update, slots, "in_proj_bias", self.in_proj_bias),
        self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
        _effective(update, slots, "out_proj.weight", self.out_proj.weight),
        _effective(update, slots, "out_proj.bias", self.out_proj.bias),
        training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
        attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
    )
    return (out.transpose(0, 1) if batch_first else out), weights
