"""The PEFT methods `saft bench step` compares against: LoRA and SHiRA from Hugging Face ``peft``.

Both are injected into a copy of the benchmark's model (same weights) on the modules a
user would target: every ``nn.Linear`` the model calls. The ``out_proj`` of an
``nn.MultiheadAttention`` is left out: the stock attention reads its tensors instead of
calling it, so an adapter there would never be in the graph (peft's own docs warn
against targeting it). In open_clip's ViTs that leaves the MLPs (``c_fc``, ``c_proj``) of
both towers.

* LoRA (Hu et al. 2021): rank ``r`` (8 by default), dropout 0, B initialised to zero.
* SHiRA (Bhardwaj et al. 2024): a random sparse mask of ``r * (in + out)`` entries per
  layer, the parameter count of a rank-``r`` LoRA; ``r`` is chosen so the total is as close
  to SAFT's entry count as an integer rank allows (at least 1).

peft is a development dependency (requirements-dev.txt); without it the benchmark measures
the other methods and says the PEFT rows were skipped.
"""

from __future__ import annotations

import copy

import torch.nn as nn


def peft_version() -> str | None:
    """peft's version when it can be imported, else None."""
    try:
        import peft
    except ImportError:
        return None
    return peft.__version__


def linear_targets(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules the model calls (not an attention's ``out_proj``)."""
    modules = dict(model.named_modules())
    names = []
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf == "out_proj" and isinstance(modules.get(parent), nn.MultiheadAttention):
            continue
        names.append(name)
    return names


def _adapted(model: nn.Module, config, prefix: str) -> tuple[nn.Module, list[nn.Parameter]]:
    from peft import inject_adapter_in_model

    adapted = inject_adapter_in_model(config, copy.deepcopy(model))
    params = []
    for name, p in adapted.named_parameters():
        p.requires_grad_(prefix in name)
        if prefix in name:
            params.append(p)
    return adapted, params


def lora_model(model: nn.Module, rank: int = 8) -> tuple[nn.Module, list[nn.Parameter], dict]:
    """A copy of ``model`` with LoRA adapters; its trainable parameters and what was set."""
    from peft import LoraConfig

    targets = linear_targets(model)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets, bias="none")
    adapted, params = _adapted(model, config, "lora_")
    return adapted, params, {"r": rank, "target_modules": len(targets)}


def shira_rank(model: nn.Module, entries: int) -> int:
    """The SHiRA rank whose entry count (``r * sum(in + out)`` over the targets) is closest to ``entries``."""
    modules = dict(model.named_modules())
    per_rank = sum(modules[n].in_features + modules[n].out_features for n in linear_targets(model))
    smallest = min(min(modules[n].in_features, modules[n].out_features) for n in linear_targets(model))
    rank = max(1, round(entries / per_rank)) if per_rank else 1
    return min(rank, max(1, smallest // 2))  # r * (in + out) <= in * out, as SHiRA requires


def shira_model(model: nn.Module, entries: int, seed: int = 0) -> tuple[nn.Module, list[nn.Parameter], dict]:
    """A copy of ``model`` with SHiRA adapters matched to ``entries`` trainable entries."""
    from peft import ShiraConfig

    targets = linear_targets(model)
    rank = shira_rank(model, entries)
    config = ShiraConfig(r=rank, mask_type="random", random_seed=seed, target_modules=targets)
    adapted, params = _adapted(model, config, "shira_")
    return adapted, params, {"r": rank, "target_modules": len(targets), "matched_to_entries": entries}
