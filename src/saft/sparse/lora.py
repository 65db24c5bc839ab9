"""LoRA through Hugging Face PEFT: adapters injected into an open_clip model, trained, exported as a delta.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a
weight ``W`` and trains ``W + (lora_alpha / r) * B @ A`` with ``A`` (r x in) drawn at
random and ``B`` (out x r) starting at zero, so training starts at the pre-trained model.
PEFT (``peft.inject_adapter_in_model``) puts the adapters into the model in place: the
modules named by ``lora_targets`` (a name or a dotted suffix, PEFT's ``target_modules``)
in both towers; the defaults are every block's attention and its two MLP projections.

open_clip's attention is ``nn.MultiheadAttention``: q, k and v come from one fused
``in_proj_weight`` (3d x d), and its ``out_proj`` is called through that weight, never
through the Linear's forward. PEFT adapts such a module with one (A, B) pair on the fused
input projection (a rank-r update of [W_q; W_k; W_v] with one A shared by q, k and v,
where separate q/k/v layers would get r each) and one on the output projection. Its own
layer merges the update into the weights before every forward and subtracts it after:
``W + dW - dW`` is not ``W`` in floating point, so the frozen base drifts by rounding
with every call; and with peft 0.21.2 it adds the output projection's update twice, in
the forward and in the merge (W_o + 2 dW_o: measured here, and the subject of
huggingface/peft pull request #3774). :class:`ExactMultiheadAttention` keeps PEFT's
parameters and initialisation and computes the forward on ``W + dW`` (each update once)
as separate tensors (``torch.func.functional_call``), so ``W`` is never written; PEFT's
custom-module API (``LoraConfig._register_custom_module``) puts it in place of PEFT's own.

:func:`lora_delta` reads the trained factors into a :class:`~saft.sparse.delta.Delta` of
low-rank entries, one per adapted weight, under the base model's parameter names;
``apply_delta`` merges them bit for bit as PEFT merges a Linear's adapter
(``W + (B @ A) * scaling``), :func:`unload_adapters` with ``merge=True`` being that merge.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from saft.sparse.config import FinetuneConfig
from saft.sparse.delta import Delta, LowRank

ADAPTER = "default"
_BASE = ".base_layer"


def _peft():
    try:
        import peft
        from peft.tuners.lora.layer import LoraLayer, MultiheadAttention
    except ImportError as exc:  # pragma: no cover - a pinned runtime dependency
        raise ImportError("method lora needs Hugging Face PEFT: pip install peft (requirements.txt pins it)") from exc
    return peft, LoraLayer, MultiheadAttention


def _exact_attention_class():
    _, _, PeftMultiheadAttention = _peft()

    class ExactMultiheadAttention(PeftMultiheadAttention):
        """PEFT's LoRA layer of ``nn.MultiheadAttention`` with a forward that never writes the base weights."""

        def _restore_weights(self) -> None:
            # PEFT's layer re-registers the weights as new Parameters on every named_modules()/state_dict(), because
            # its forward leaves them unregistered; this forward never does, and the model keeps its own Parameters
            # (and their order) throughout
            pass

        def forward(self, query: torch.Tensor, *args, **kwargs):
            if self.disable_adapters or self.merged:
                return super().forward(query, *args, **kwargs)
            base = self.get_base_layer()
            w_in, w_out = base.in_proj_weight, base.out_proj.get_base_layer().weight
            for adapter in self.active_adapters:
                if adapter in self.lora_A:
                    w_in = w_in + self.get_delta_weight(adapter).to(w_in.dtype)
                    w_out = w_out + base.out_proj.get_delta_weight(adapter).to(w_out.dtype)
            # out_proj is PEFT's Linear wrapping the original: MultiheadAttention reads its weight through it
            return torch.func.functional_call(base, {"in_proj_weight": w_in, "out_proj.base_layer.weight": w_out},
                                              (query, *args), kwargs, strict=False)

    return ExactMultiheadAttention


def lora_config(cfg: FinetuneConfig):
    """PEFT's ``LoraConfig`` for ``cfg``: rank, lora_alpha and targets; no dropout (a delta must be deterministic)."""
    peft, _, _ = _peft()
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                             lora_dropout=0.0, bias="none")
    config._register_custom_module({nn.MultiheadAttention: _exact_attention_class()})
    return config


def base_name(module_path: str, param: str) -> str:
    """The base model's name of an adapted weight (PEFT nests the original module as ``base_layer``)."""
    return f"{module_path.replace(_BASE, '')}.{param}"


def _adapted(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    _, LoraLayer, _ = _peft()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


@contextlib.contextmanager
def lora_adapters(model: nn.Module, cfg: FinetuneConfig, *, seed: int = 0) -> Iterator[list[nn.Parameter]]:
    """Inject the adapters of ``cfg`` into ``model`` for the block; yields their parameters (a fixed order).

    The random ``A`` factors are drawn from ``seed`` on the CPU (PEFT initialises them there,
    then moves them to the base layer's device), the global RNG left as it was.
    On exit the model is given back as it came in: the original modules in place, their
    weights never written, no attribute of PEFT's left behind.
    """
    peft, _, _ = _peft()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    had_config = "peft_config" in vars(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            peft.inject_adapter_in_model(lora_config(cfg), model, adapter_name=ADAPTER)
        except ValueError as exc:
            if "target modules" in str(exc).lower():
                raise ValueError(f"lora_targets {list(cfg.lora_targets)} match no module of this model: name modules "
                                 "as the model does, e.g. attn, mlp.c_fc, mlp.c_proj (open_clip)") from None
            raise
    try:
        yield [p for n, p in model.named_parameters() if "lora_" in n]
    finally:
        unload_adapters(model)
        if not had_config:
            vars(model).pop("peft_config", None)
        for n, p in model.named_parameters():
            p.requires_grad_(before.get(n, p.requires_grad))


def unload_adapters(model: nn.Module, *, merge: bool = False) -> None:
    """Put every adapted module's original back, with PEFT's own merge of the adapters first when ``merge``
    (outermost first: an attention layer restores its out_proj)."""
    for name, module in list(_adapted(model)):
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            continue  # inside an attention layer unloaded just now
        if getattr(parent, child, None) is not module:
            continue
        if isinstance(module.get_base_layer(), nn.MultiheadAttention):
            # the original module and Parameter objects (PEFT's unload registers new Parameters, which would
            # reorder the module's parameters and so every later run's)
            original = module.get_base_layer()
            if merge:  # PEFT's in_proj merge, and its Linear's merge of out_proj once (see the module docstring)
                with torch.no_grad():
                    for adapter in module.active_adapters:
                        if adapter in module.lora_A:
                            original.in_proj_weight.add_(module.get_delta_weight(adapter).to(original.in_proj_weight.dtype))
                original.out_proj.merge()
            original.out_proj = original.out_proj.get_base_layer()
        else:
            if merge:
                module.merge()
            original = module.get_base_layer()
        setattr(parent, child, original)


def lora_delta(model: nn.Module, base_fingerprint: str, meta: dict[str, str] | None = None) -> Delta:
    """The trained adapters of ``model`` (inside :func:`lora_adapters`) as low-rank delta entries."""
    factors: dict[str, LowRank] = {}
    for path, module in _adapted(model):
        if ADAPTER not in module.lora_A:
            continue
        param = "in_proj_weight" if isinstance(module.get_base_layer(), nn.MultiheadAttention) else "weight"
        factors[base_name(path, param)] = LowRank(module.lora_A[ADAPTER].weight.detach().cpu().clone(),
                                                  module.lora_B[ADAPTER].weight.detach().cpu().clone(),
                                                  float(module.scaling[ADAPTER]))
    return Delta({}, {}, base_fingerprint, dict(meta or {}), factors)


__all__ = ["lora_adapters", "lora_config", "lora_delta", "unload_adapters"]
