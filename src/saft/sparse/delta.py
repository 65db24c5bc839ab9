"""Deltas: what fine-tuning changed, stored apart from the base model.

A sparse entry stores flat indices and values (W_ft = W + values at indices); a dense
entry (full fine-tuning) stores the whole difference W_ft - W; a low-rank entry (LoRA)
stores its factors, W_ft = W + scale * B @ A, so a rank-8 update of a 768 x 768 weight
is 12k values, not 590k. ``apply_delta`` adds ``alpha * delta`` in place and remembers
the overwritten entries, so ``remove_delta`` restores the base bit for bit; alpha in
[0, 1] traces a WiSE-FT-like trade-off curve.

A delta may also carry class-embedding offsets (LP-FT's probe, :mod:`saft.sparse.lpft`):
a classifier's head is then the zero-shot class embeddings plus ``alpha`` times the
offset of each class it names (:meth:`Delta.head_offsets`); the model has no head to
merge them into, so whoever builds a head adds them (evaluation, selection, serving).

Deltas with only sparse and dense entries keep the format ``saft-delta/1``; one with
low-rank entries or head offsets is written as ``saft-delta/2``, which a reader that
knows only the first refuses rather than applying part of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from saft.io import load_tensors, save_tensors
from saft.models.fingerprint import fingerprint_model
from saft.sparse.kernels import scatter_values

DELTA_FORMAT = "saft-delta/1"
DELTA_FORMAT_V2 = "saft-delta/2"
DELTA_FORMATS = (DELTA_FORMAT, DELTA_FORMAT_V2)
_IDX, _VAL = "::indices", "::values"
_LORA_A, _LORA_B, _LORA_SCALE = "::lora_A", "::lora_B", "::lora_scale"
_HEAD = "head::offsets"
HEAD_CLASSES_META = "head_classes"


@dataclass
class LowRank:
    """A low-rank update ``scale * b @ a`` of a weight (``b``: out x r, ``a``: r x in)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.b.shape[0]), int(self.a.shape[1])

    def product(self) -> torch.Tensor:
        """The update, computed as PEFT merges it (``(B @ A) * scaling``), so a merge matches PEFT's bit for bit."""
        return (self.b @ self.a) * self.scale

    def to(self, device) -> "LowRank":
        return LowRank(self.a.to(device), self.b.to(device), self.scale)


class FingerprintMismatch(ValueError):
    """The delta was trained on other base weights than the model it is applied to."""


@dataclass
class Delta:
    values: dict[str, torch.Tensor]  # name -> k values (sparse) or full-shape difference (dense)
    indices: dict[str, torch.Tensor]  # name -> flat indices; absent for dense entries
    base_fingerprint: str
    meta: dict[str, str] = field(default_factory=dict)
    factors: dict[str, LowRank] = field(default_factory=dict)  # name -> low-rank update (LoRA)
    head: torch.Tensor | None = None  # [n_classes, dim] class-embedding offsets (LP-FT), rows in head_classes order
    head_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.head_classes = tuple(self.head_classes)
        if self.head is not None and self.head.shape[0] != len(self.head_classes):
            raise ValueError(f"the delta's head offsets have {self.head.shape[0]} rows but name "
                             f"{len(self.head_classes)} classes")
        both = sorted(set(self.values) & set(self.factors))
        if both:
            raise ValueError(f"tensor {both[0]!r} has both a low-rank and a sparse/dense entry")

    @property
    def num_values(self) -> int:
        """Trained values the delta holds (a low-rank entry: its two factors)."""
        return (sum(v.numel() for v in self.values.values())
                + sum(f.a.numel() + f.b.numel() for f in self.factors.values())
                + (self.head.numel() if self.head is not None else 0))

    @property
    def names(self) -> list[str]:
        """The model tensors the delta changes."""
        return sorted([*self.values, *self.factors])

    def is_sparse(self, name: str) -> bool:
        return name in self.indices

    def scaled(self, alpha: float) -> "Delta":
        return Delta({n: v * alpha for n, v in self.values.items()}, dict(self.indices), self.base_fingerprint,
                     dict(self.meta), {n: LowRank(f.a, f.b, f.scale * alpha) for n, f in self.factors.items()},
                     None if self.head is None else self.head * alpha, self.head_classes)

    def to(self, device) -> "Delta":
        """This delta with every tensor on ``device``."""
        return Delta({n: v.to(device) for n, v in self.values.items()},
                     {n: i.to(device) for n, i in self.indices.items()}, self.base_fingerprint, dict(self.meta),
                     {n: f.to(device) for n, f in self.factors.items()},
                     None if self.head is None else self.head.to(device), self.head_classes)

    def nbytes(self) -> int:
        tensors = [*self.values.values(), *self.indices.values(), *(x for f in self.factors.values()
                                                                    for x in (f.a, f.b))]
        tensors += [self.head] if self.head is not None else []
        return sum(t.numel() * t.element_size() for t in tensors)

    def head_offsets(self, class_names, alpha: float = 1.0) -> torch.Tensor | None:
        """``alpha`` times the offsets of ``class_names`` in order, zero for a class the delta does not name (a new
        class of base-to-new keeps its zero-shot embedding); None when the delta carries no head."""
        if self.head is None:
            return None
        rows = {name: i for i, name in enumerate(self.head_classes)}
        out = torch.zeros(len(class_names), self.head.shape[1], dtype=self.head.dtype, device=self.head.device)
        known = [(i, rows[c]) for i, c in enumerate(class_names) if c in rows]
        if known:
            mine, theirs = zip(*known)
            out[list(mine)] = self.head[list(theirs)]
        return out * alpha

    def save(self, path: str | Path) -> Path:
        tensors = {}
        for name, v in self.values.items():
            tensors[name + _VAL] = v
            if name in self.indices:
                idx = self.indices[name]
                small = int(idx.max()) < 2**31 if idx.numel() else True
                tensors[name + _IDX] = idx.to(torch.int32 if small else torch.int64)
        for name, f in self.factors.items():
            tensors[name + _LORA_A], tensors[name + _LORA_B] = f.a, f.b
            tensors[name + _LORA_SCALE] = torch.tensor([f.scale], dtype=torch.float64)  # PEFT's scaling, exactly
        meta = {**self.meta, "base_fingerprint": self.base_fingerprint}
        if self.head is not None:
            tensors[_HEAD] = self.head
            meta[HEAD_CLASSES_META] = json.dumps(list(self.head_classes))
        fmt = DELTA_FORMAT_V2 if self.factors or self.head is not None else DELTA_FORMAT
        return save_tensors(path, tensors, meta, fmt)

    @classmethod
    def load(cls, path: str | Path) -> "Delta":
        tensors, meta = load_tensors(path, DELTA_FORMATS, "delta")
        meta.pop("format", None)
        values = {k[: -len(_VAL)]: t for k, t in tensors.items() if k.endswith(_VAL)}
        indices = {k[: -len(_IDX)]: t.long() for k, t in tensors.items() if k.endswith(_IDX)}
        factors = {}
        for key in tensors:
            if key.endswith(_LORA_A):
                name = key[: -len(_LORA_A)]
                try:
                    factors[name] = LowRank(tensors[key], tensors[name + _LORA_B],
                                            float(tensors[name + _LORA_SCALE].reshape(-1)[0]))
                except KeyError as exc:
                    raise ValueError(f"{path}: low-rank entry {name!r} lacks {exc.args[0]!r} (the file is "
                                     "damaged)") from None
        head, classes = tensors.get(_HEAD), ()
        if head is not None:
            try:
                classes = tuple(json.loads(meta.pop(HEAD_CLASSES_META)))
            except (KeyError, ValueError):
                raise ValueError(f"{path}: the delta's head offsets name no classes (the file is damaged)") from None
        return cls(values, indices, meta.pop("base_fingerprint", ""), meta, factors, head, classes)


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
    missing = [n for n in delta.names if n not in params]
    if missing:
        raise KeyError(f"delta tensors not in the model: {missing[:5]}")
    for name, f in delta.factors.items():
        if params[name].dim() != 2 or f.shape != tuple(params[name].shape) or f.b.shape[1] != f.a.shape[0]:
            raise ValueError(f"low-rank delta {name!r} has factors {tuple(f.b.shape)} @ {tuple(f.a.shape)}, model "
                             f"{tuple(params[name].shape)} (the delta does not belong to this model, or its file is "
                             "damaged)")
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
        for name, f in delta.factors.items():
            p = params[name]
            dense[name] = p.detach().clone()
            p.add_(f.to(p.device).product().to(p.dtype), alpha=alpha)
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
