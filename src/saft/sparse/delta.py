"""Deltas: what fine-tuning changed, stored apart from the base model.

A sparse entry stores flat indices and values (W_ft = W + values at indices); a dense
entry (full fine-tuning) stores the whole difference W_ft - W. ``apply_delta`` adds
``alpha * delta`` in place and remembers the overwritten entries, so ``remove_delta``
restores the base bit for bit; alpha in [0, 1] traces a WiSE-FT-like trade-off curve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from saft.io import load_tensors, save_tensors
from saft.models.fingerprint import fingerprint_model
from saft.sparse.kernels import scatter_values

DELTA_FORMAT = "saft-delta/1"
_IDX, _VAL = "::indices", "::values"


class FingerprintMismatch(ValueError):
    """The delta was trained on other base weights than the model it is applied to."""


@dataclass
class Delta:
    values: dict[str, torch.Tensor]  # name -> k values (sparse) or full-shape difference (dense)
    indices: dict[str, torch.Tensor]  # name -> flat indices; absent for dense entries
    base_fingerprint: str
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def num_values(self) -> int:
        return sum(v.numel() for v in self.values.values())

    def is_sparse(self, name: str) -> bool:
        return name in self.indices

    def scaled(self, alpha: float) -> "Delta":
        return Delta({n: v * alpha for n, v in self.values.items()}, dict(self.indices),
                     self.base_fingerprint, dict(self.meta))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.values.values(), *self.indices.values()])

    def save(self, path: str | Path) -> Path:
        tensors = {}
        for name, v in self.values.items():
            tensors[name + _VAL] = v
            if name in self.indices:
                idx = self.indices[name]
                small = int(idx.max()) < 2**31 if idx.numel() else True
                tensors[name + _IDX] = idx.to(torch.int32 if small else torch.int64)
        meta = {**self.meta, "base_fingerprint": self.base_fingerprint}
        return save_tensors(path, tensors, meta, DELTA_FORMAT)

    @classmethod
    def load(cls, path: str | Path) -> "Delta":
        tensors, meta = load_tensors(path, DELTA_FORMAT, "delta")
        values = {k[: -len(_VAL)]: t for k, t in tensors.items() if k.endswith(_VAL)}
        indices = {k[: -len(_IDX)]: t.long() for k, t in tensors.items() if k.endswith(_IDX)}
        return cls(values, indices, meta.pop("base_fingerprint", ""), meta)


def save_delta(delta: Delta, path: str | Path) -> Path:
    return delta.save(path)


def load_delta(path: str | Path) -> Delta:
    return Delta.load(path)


@dataclass
class _Merged:
    delta_id: int
    sparse: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (indices, overwritten entries)
    dense: dict[str, torch.Tensor]  # name -> overwritten tensor


def apply_delta(model: nn.Module, delta: Delta, alpha: float = 1.0, *, check_fingerprint: bool = True) -> nn.Module:
    """Merge ``alpha * delta`` into ``model`` in place; undo with ``remove_delta``.

    The fingerprint check compares the model's current weights with the delta's base, so
    a second delta cannot be stacked on top of a merged one unless the check is disabled.
    """
    if check_fingerprint:
        fp = fingerprint_model(model)
        if fp != delta.base_fingerprint:
            base = delta.meta.get("base_model", "unknown base")
            raise FingerprintMismatch(
                f"delta was trained on {base} (fingerprint {delta.base_fingerprint[:12]}...) but the "
                f"model's weights have fingerprint {fp[:12]}...: load the matching base model "
                "(or remove deltas merged earlier) before applying it"
            )
    params = dict(model.named_parameters())
    missing = [n for n in delta.values if n not in params]
    if missing:
        raise KeyError(f"delta tensors not in the model: {missing[:5]}")
    for name, values in delta.values.items():
        p = params[name]
        if name in delta.indices:
            idx = delta.indices[name]
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
                raise ValueError(f"delta indices of {name!r} fall outside its {p.numel()} entries (the delta does "
                                 "not belong to this model, or its file is damaged)")
            if idx.numel() != values.numel():
                raise ValueError(f"delta {name!r} holds {idx.numel()} indices but {values.numel()} values")
        elif tuple(values.shape) != tuple(p.shape):
            raise ValueError(f"dense delta {name!r} has shape {tuple(values.shape)}, model {tuple(p.shape)}")
    sparse, dense = {}, {}
    with torch.no_grad():
        for name, values in delta.values.items():
            p = params[name]
            values = values.to(p.device)
            if name in delta.indices:
                idx = delta.indices[name].to(p.device)
                sparse[name] = (idx, p.detach().reshape(-1)[idx].clone())
                p.copy_(scatter_values(p, idx, values, alpha))
            else:
                dense[name] = p.detach().clone()
                p.add_(values.to(p.dtype), alpha=alpha)
    model.__dict__.setdefault("_saft_merged", []).append(_Merged(id(delta), sparse, dense))
    return model


def remove_delta(model: nn.Module, delta: Delta | None = None) -> nn.Module:
    """Undo the most recent ``apply_delta`` exactly (bit for bit)."""
    stack = model.__dict__.get("_saft_merged") or []
    if not stack:
        raise RuntimeError("no delta is merged into this model")
    if delta is not None and stack[-1].delta_id != id(delta):
        raise RuntimeError("this delta is not the most recently merged one: remove deltas in reverse order")
    merged = stack.pop()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (idx, original) in merged.sparse.items():
            params[name].view(-1)[idx] = original
        for name, original in merged.dense.items():
            params[name].copy_(original)
    return model


def delta_from_sparse(update, base_fingerprint: str, meta: dict[str, str] | None = None) -> Delta:
    """Freeze a trained ``SparseUpdate`` into a delta."""
    values = {n: v.detach().cpu().clone() for n, _, v in update.items()}
    indices = {n: i.detach().cpu().clone() for n, i, _ in update.items()}
    return Delta(values, indices, base_fingerprint, dict(meta or {}))


def delta_from_dense(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], base_fingerprint: str,
                     meta: dict[str, str] | None = None) -> Delta:
    """The difference of two state dicts, keeping only tensors that changed."""
    values = {}
    for name, b in base.items():
        diff = tuned[name].detach().cpu() - b.detach().cpu()
        if torch.count_nonzero(diff):
            values[name] = diff
    return Delta(values, {}, base_fingerprint, dict(meta or {}))
