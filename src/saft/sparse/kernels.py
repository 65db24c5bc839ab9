"""Autograd functions that compute gradients only for the selected entries of a weight.

A frozen weight W with trainable sparse values v at flat indices idx acts as
W_eff = W + scatter(idx, v). For a Linear layer the dense weight gradient
grad_out^T @ input costs as much as the forward matmul; the gradient of v needs only
``sum_t grad_out[t, i] * input[t, j]`` for each selected (i, j), which is O(tokens * k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Upper bound on tokens * entries gathered at once when forming value gradients.
_GATHER_BUDGET = 1 << 24


def scatter_values(base: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """base + alpha * scatter(idx, values), out of place, differentiable in ``values``.

    Training, merging and delta application all go through this one function, so a
    merged model is bit-identical to the model that was trained.
    """
    flat = base.detach().reshape(-1)
    return flat.index_add(0, idx, values.to(base.dtype), alpha=alpha).view_as(base)


def _value_grad(gy2: torch.Tensor, x2: torch.Tensor, idx: torch.Tensor, in_features: int) -> torch.Tensor:
    """Gradient of the selected weight entries: sum over tokens of gy[:, row] * x[:, col]."""
    rows, cols = idx // in_features, idx % in_features
    gy_t = gy2.t().contiguous()
    x_t = x2.t().contiguous()
    tokens = max(gy2.shape[0], 1)
    chunk = max(1, _GATHER_BUDGET // tokens)
    parts = []
    for start in range(0, idx.numel(), chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        parts.append((gy_t.index_select(0, r) * x_t.index_select(0, c)).sum(dim=1))
    return torch.cat(parts) if parts else gy2.new_zeros(0)


class SparseLinearFn(torch.autograd.Function):
    """y = x @ W_eff^T + b_eff with gradients only for x and the sparse values."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_values, w_idx, b_values, b_idx):
        w_eff = weight if w_values is None else scatter_values(weight, w_idx, w_values)
        b_eff = bias
        if b_values is not None:
            b_eff = scatter_values(bias, b_idx, b_values)
        y = F.linear(x, w_eff, b_eff)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        ctx.save_for_backward(
            x if need_w else None,
            w_eff if need_x else None,
            w_idx if need_w else None,
            b_idx if ctx.needs_input_grad[5] else None,
        )
        ctx.shapes = (x.dtype, weight.shape[1], w_values.dtype if w_values is not None else None,
                      b_values.dtype if b_values is not None else None)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w_eff, w_idx, b_idx = ctx.saved_tensors
        x_dtype, in_features, w_dtype, b_dtype = ctx.shapes
        gx = gw = gb = None
        gy2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = (gy @ w_eff.to(gy.dtype)).to(x_dtype)
        if ctx.needs_input_grad[3]:
            x2 = x.reshape(-1, in_features)
            compute = torch.promote_types(gy2.dtype, torch.float32)
            gw = _value_grad(gy2.to(compute), x2.to(compute), w_idx, in_features).to(w_dtype)
        if ctx.needs_input_grad[5]:
            gb = gy2.float().sum(dim=0).index_select(0, b_idx).to(b_dtype)
        return gx, None, None, gw, None, gb, None


def sparse_linear(x, weight, bias, w_values=None, w_idx=None, b_values=None, b_idx=None):
    return SparseLinearFn.apply(x, weight, bias, w_values, w_idx, b_values, b_idx)


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
