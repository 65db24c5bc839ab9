"""Autograd functions that compute gradients only for the selected entries of a weight.

A frozen weight W with trainable sparse values v at flat indices idx acts as
W_eff = W + scatter(idx, v). The gradient of v needs only
``sum_t grad_out[t, i] * input[t, j]`` for each selected (i, j); how those sums are
formed (gathered pairs, or a product over the selected rows and columns only) is chosen
per tensor by cost (:mod:`saft.sparse.value_grad`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from saft.sparse.value_grad import EntryLayout, current_strategy, value_grad


def scatter_values(base: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, alpha: float = 1.0,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """base + alpha * scatter(idx, values), out of place, differentiable in ``values``.

    Training, merging and delta application all go through this one function, so a
    merged model is bit-identical to the model that was trained. The selected entries
    are computed in the base's dtype and written with ``index_put`` (the indices of a
    mask are unique), which is deterministic on every device, unlike ``index_add``'s
    atomics on CUDA. With ``dtype`` (autocast's) the result is that dtype: one cast
    of the weight, as autocast would make anyway, and no fp32 copy.
    """
    flat = base.detach().reshape(-1)
    entries = flat.index_select(0, idx) + alpha * values.to(base.dtype)
    if dtype is not None and dtype != base.dtype:
        flat, entries = flat.to(dtype), entries.to(dtype)
    return flat.index_put((idx,), entries).view(base.shape)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class SparseLinearFn(torch.autograd.Function):
    """y = x @ W_eff^T + b_eff with gradients only for x and the sparse values."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_values, w_idx, b_values, b_idx, w_layout, w_effective):
        # Under autocast compute (and save) in its dtype, as F.linear would: the effective
        # weight is built directly in that dtype, the input is saved in it.
        amp = _autocast_dtype(x.device.type)
        in_dtype = x.dtype
        if amp is not None:
            x = x.to(amp)
        if w_values is None:
            w_eff = weight if amp is None else weight.to(amp)
        elif w_effective is not None:
            w_eff = w_effective(amp)
        else:
            w_eff = scatter_values(weight, w_idx, w_values, dtype=amp)
        b_eff = bias
        if b_values is not None:
            b_eff = scatter_values(bias, b_idx, b_values, dtype=amp)
        elif bias is not None and amp is not None:
            b_eff = bias.to(amp)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x, w_eff, b_eff)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        ctx.save_for_backward(
            x if need_w else None,
            w_eff if need_x else None,
            b_idx if ctx.needs_input_grad[5] else None,
        )
        ctx.shapes = (in_dtype, weight.shape[1], w_values.dtype if w_values is not None else None,
                      b_values.dtype if b_values is not None else None)
        if need_w and w_layout is None:
            w_layout = EntryLayout(w_idx, weight.shape[0], weight.shape[1])
        ctx.layout = w_layout if need_w else None
        ctx.strategy = current_strategy()
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w_eff, b_idx = ctx.saved_tensors
        x_dtype, in_features, w_dtype, b_dtype = ctx.shapes
        gx = gw = gb = None
        gy2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = (gy @ w_eff.to(gy.dtype)).to(x_dtype)
        if ctx.needs_input_grad[3]:
            gw = value_grad(gy2, x.reshape(-1, in_features), ctx.layout, ctx.strategy).to(w_dtype)
        if ctx.needs_input_grad[5]:
            gb = gy2.sum(dim=0, dtype=torch.float32).index_select(0, b_idx).to(b_dtype)
        return gx, None, None, gw, None, gb, None, None, None


def sparse_linear(x, weight, bias, w_values=None, w_idx=None, b_values=None, b_idx=None,
                  w_layout: EntryLayout | None = None,
                  w_effective: Callable[[torch.dtype | None], torch.Tensor] | None = None):
    """``F.linear(x, W + scatter(w_idx, w_values), b + scatter(b_idx, b_values))``, gradients for x and the values.

    ``w_layout`` is ``w_idx`` as rows and columns (:class:`EntryLayout`); pass it to reuse one
    across steps, else it is derived from ``w_idx`` at each call. ``w_effective(dtype)``, when
    given, returns ``scatter_values(weight, w_idx, w_values, dtype=dtype)`` (e.g. from a cache
    valid while the values are unchanged); no graph is needed through it.
    """
    return SparseLinearFn.apply(x, weight, bias, w_values, w_idx, b_values, b_idx, w_layout, w_effective)


def sparse_embedding(tokens: torch.Tensor, weight: torch.Tensor, values: torch.Tensor | None,
                     idx: torch.Tensor | None) -> torch.Tensor:
    """``F.embedding(tokens, W + scatter(idx, values))`` without materialising W + scatter.

    A token embedding holds 25-49M entries (49408 tokens x 512-768), of which a mask
    selects a few hundred. The rows holding selected entries go into a small table
    (one extra all-zero row for every other token), looked up by the same tokens and
    added to the frozen lookup: a gather of the batch's tokens instead of a dense copy of
    the matrix and a dense gradient every step. The sum is bit-identical to the dense
    path (unselected entries add an exact zero); ``values`` get their gradient through the
    table's scatter, which uses unique indices (``index_put``), so it is deterministic.
    """
    out = F.embedding(tokens, weight)
    if values is None or idx is None or idx.numel() == 0:
        return out
    dim = weight.shape[1]
    rows, cols = idx // dim, idx % dim
    selected_rows, slot = torch.unique(rows, return_inverse=True)
    table = values.new_zeros(selected_rows.numel() + 1, dim, dtype=weight.dtype)
    table = table.index_put((slot + 1, cols), values.to(weight.dtype))
    lookup = torch.zeros(weight.shape[0], dtype=torch.long, device=tokens.device)
    lookup[selected_rows] = torch.arange(1, selected_rows.numel() + 1, device=tokens.device)
    return out + F.embedding(lookup[tokens], table)


def patchify(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, int, int]:
    """[B, C, H, W] -> [B, gh*gw, C*p*p] in the flattening order of a Conv2d weight."""
    b, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    x = x[:, :, : gh * patch, : gw * patch]
    x = x.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, gh * gw, c * patch * patch), gh, gw
