"""Sparse masks: which entries of which tensors are fine-tuned.

A mask holds, per selected tensor, the sorted flat indices of its chosen entries. It is
stored as safetensors (one int32/int64 tensor per parameter name, the type chosen by the
tensor's size) with metadata naming the base model, density, rule and data.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from saft.io import load_tensors, save_tensors
from saft.sparse.scores import Scores

MASK_FORMAT = "saft-mask/1"


@dataclass
class Mask:
    indices: dict[str, torch.Tensor]  # name -> sorted int64 flat indices
    shapes: dict[str, tuple[int, ...]]  # name -> shape, for every eligible tensor
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, idx in self.indices.items():
            if name not in self.shapes:
                raise ValueError(f"mask tensor {name!r} has no recorded shape")
            numel = math.prod(self.shapes[name])
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise ValueError(f"mask indices of {name!r} fall outside its {numel} entries")

    @property
    def num_selected(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def eligible_count(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def counts(self) -> dict[str, int]:
        return {n: int(i.numel()) for n, i in self.indices.items()}

    def to_dense(self, name: str) -> torch.Tensor:
        """Boolean tensor of the parameter's shape, True where selected."""
        dense = torch.zeros(math.prod(self.shapes[name]), dtype=torch.bool)
        if name in self.indices:
            dense[self.indices[name]] = True
        return dense.view(self.shapes[name])

    def stats(self) -> dict:
        """Per-tensor and per-block counts, for logs and plots."""
        per_tensor = OrderedDict()
        for name in sorted(self.shapes):
            numel = math.prod(self.shapes[name])
            k = int(self.indices[name].numel()) if name in self.indices else 0
            per_tensor[name] = {"selected": k, "numel": numel, "fraction": k / numel}
        per_block: dict[str, dict[str, int]] = OrderedDict()
        for name, row in per_tensor.items():
            block = block_of(name)
            agg = per_block.setdefault(block, {"selected": 0, "numel": 0})
            agg["selected"] += row["selected"]
            agg["numel"] += row["numel"]
        return {
            "num_selected": self.num_selected,
            "eligible": self.eligible_count,
            "density": self.num_selected / max(self.eligible_count, 1),
            "tensors_with_selection": sum(1 for r in per_tensor.values() if r["selected"]),
            "tensors_eligible": len(per_tensor),
            "per_block": per_block,
            "per_tensor": per_tensor,
        }

    def save(self, path: str | Path) -> Path:
        tensors = {}
        for name, idx in self.indices.items():
            dtype = torch.int32 if math.prod(self.shapes[name]) < 2**31 else torch.int64
            tensors[name] = idx.to(dtype)
        meta = dict(self.meta)
        meta.update(shapes=json.dumps({n: list(s) for n, s in self.shapes.items()}, sort_keys=True),
                    num_selected=str(self.num_selected))
        return save_tensors(path, tensors, meta, MASK_FORMAT)

    @classmethod
    def load(cls, path: str | Path) -> "Mask":
        tensors, meta = load_tensors(path, MASK_FORMAT, "mask")
        shapes = {n: tuple(s) for n, s in json.loads(meta.pop("shapes")).items()}
        meta.pop("num_selected", None)
        return cls({n: t.long() for n, t in tensors.items()}, shapes, meta)


_BLOCK_RE = re.compile(r"^(.*?(?:resblocks|blocks?|layers?\d*)\.\d+)\.")


def block_of(name: str) -> str:
    """Group a parameter name into its transformer/residual block, or its top module."""
    match = _BLOCK_RE.match(name)
    if match:
        return match.group(1)
    head, _, _ = name.rpartition(".")
    return head or name


def target_count(density: float, eligible: int) -> int:
    """k = round(density * eligible), halves rounded up; at least one entry."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return max(1, math.floor(density * eligible + 0.5))


def select_mask(scores: Scores, density: float = 0.001, *, meta: Mapping[str, str] | None = None) -> Mask:
    """Global top-k over all eligible entries, exactly k of them.

    The global top-k is contained in the union of each tensor's own top-min(k, n)
    entries, so only those candidates are gathered: memory stays O(k * tensors)
    instead of a copy of every score.
    """
    shapes = {n: tuple(v.shape) for n, v in scores.values.items()}
    k = target_count(density, scores.eligible_count)
    names, cand_vals, cand_idx, cand_owner = [], [], [], []
    for i, (name, score) in enumerate(scores.values.items()):
        flat = score.detach().reshape(-1).float()
        take = min(k, flat.numel())
        vals, idx = torch.topk(flat, take, sorted=False)
        names.append(name)
        cand_vals.append(vals.cpu())
        cand_idx.append(idx.cpu())
        cand_owner.append(torch.full((take,), i, dtype=torch.int32))
    vals = torch.cat(cand_vals)
    if not torch.isfinite(vals).all():
        raise ValueError("scores contain NaN or inf: check the data and the loss before masking")
    _, top = torch.topk(vals, k, sorted=False)
    owner = torch.cat(cand_owner)[top]
    flat_idx = torch.cat(cand_idx)[top]
    indices = {}
    for i, name in enumerate(names):
        chosen = flat_idx[owner == i]
        if chosen.numel():
            indices[name] = torch.sort(chosen.long()).values
    info = {"density": repr(density), "score_rule": scores.rule, "mask_kind": "saft",
            "num_examples": str(scores.num_examples)}
    info.update(scores.meta)
    info.update(meta or {})
    return Mask(indices, shapes, info)



def select_mask_layerwise(scores: Scores, density: float = 0.001, *,
                          meta: Mapping[str, str] | None = None) -> Mask:
    """Per-tensor top-k: each eligible tensor keeps its own round(density * numel) best entries.

    An ablation of the global rule: one tensor whose scores are on a larger scale (a
    patch embedding, say) cannot take the whole budget. Tensors with fewer than
    1 / (2 * density) entries get none, so the total is close to, not exactly, the
    global k.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    shapes = {n: tuple(v.shape) for n, v in scores.values.items()}
    indices = {}
    for name, score in scores.values.items():
        flat = score.detach().reshape(-1).float()
        take = math.floor(density * flat.numel() + 0.5)
        if not take:
            continue
        if not torch.isfinite(flat).all():
            raise ValueError("scores contain NaN or inf: check the data and the loss before masking")
        _, idx = torch.topk(flat, take, sorted=False)
        indices[name] = torch.sort(idx.cpu().long()).values
    if not indices:
        raise ValueError(f"density {density} leaves no entry in any tensor: every tensor is too small")
    info = {"density": repr(density), "score_rule": scores.rule, "mask_kind": "saft",
            "selection": "layerwise", "num_examples": str(scores.num_examples)}
    info.update(scores.meta)
    info.update(meta or {})
    return Mask(indices, shapes, info)

def random_mask(
    shapes: Mapping[str, tuple[int, ...]],
    density: float = 0.001,
    *,
    seed: int = 0,
    like: Mask | None = None,
    meta: Mapping[str, str] | None = None,
) -> Mask:
    """A uniformly random mask: the ablation SAFT's gradient selection is compared with.

    With ``like``, each tensor gets exactly as many entries as in that mask (same
    per-tensor counts); otherwise k entries are drawn uniformly over all eligible ones.
    """
    shapes = {n: tuple(s) for n, s in shapes.items()}
    gen = torch.Generator().manual_seed(seed)
    names = list(shapes)
    sizes = [math.prod(shapes[n]) for n in names]
    indices: dict[str, torch.Tensor] = {}
    if like is not None:
        for name, ref in like.indices.items():
            if name not in shapes:
                raise ValueError(f"reference mask tensor {name!r} is not among the eligible tensors")
            n = math.prod(shapes[name])
            indices[name] = torch.sort(_sample_without_replacement(n, ref.numel(), gen)).values
        mode = "per_tensor"
    else:
        total = sum(sizes)
        k = target_count(density, total)
        flat = _sample_without_replacement(total, k, gen)
        offsets = torch.tensor([0] + sizes).cumsum(0)
        owner = torch.searchsorted(offsets, flat, right=True) - 1
        for i, name in enumerate(names):
            chosen = flat[owner == i] - offsets[i]
            if chosen.numel():
                indices[name] = torch.sort(chosen).values
        mode = "global"
    info = {"density": repr(density), "mask_kind": "random", "random_mode": mode, "seed": str(seed)}
    info.update(meta or {})
    return Mask(indices, shapes, info)


def _sample_without_replacement(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if k > n:
        raise ValueError(f"cannot draw {k} distinct entries from {n}")
    if k * 4 >= n:  # dense draw: a permutation is cheaper than rejection
        return torch.randperm(n, generator=gen)[:k]
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        need = k - chosen.numel()
        draw = torch.randint(0, n, (need + need // 4 + 8,), generator=gen)
        chosen = torch.unique(torch.cat([chosen, draw]))
        if chosen.numel() > k:  # keep a random subset, not the smallest values
            chosen = chosen[torch.randperm(chosen.numel(), generator=gen)[:k]]
    return chosen
