"""Per-step time and training-state memory of full fine-tuning, naive masked SAFT and ours.

All methods are measured in one run on the same model, data and mask, so the ratios
are meaningful on any machine. ``floor`` is the cost no weight-sparse method can beat:
forward plus the input-gradient backward, with no weight gradient and no optimizer.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from saft.models import load_model
from saft.sparse.mask import select_mask
from saft.sparse.objective import ClassPrompts, classification_loss
from saft.sparse.scores import Eligibility, importance_scores
from saft.sparse.update import SparseUpdate

METHODS = ("full", "masked_dense", "saft", "floor")


@dataclass
class StepBenchConfig:
    arch: str = "ViT-B-32"
    image_size: int = 224
    batch_size: int = 16
    num_classes: int = 10
    density: float = 0.001
    warmup: int = 2
    repeats: int = 5
    lr: float = 1e-5
    seed: int = 0
    device: str = "cpu"


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(_tensor_bytes(s.values()) for s in opt.state.values())


def environment(device: torch.device, **extra) -> dict:
    """What a step benchmark ran on: torch, the machine and the device (plus ``extra``)."""
    return {"torch": torch.__version__, **extra, "machine": platform.machine(), "processor": platform.processor(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def mask_summary(mask) -> dict:
    """The mask's counts a step benchmark reports (not its per-tensor table)."""
    stats = mask.stats()
    return {k: stats[k] for k in ("num_selected", "eligible", "tensors_with_selection", "tensors_eligible")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _InputGradHooks:
    """Make the first activations of both towers require grad: backward then runs through
    every layer computing input gradients only (the floor)."""

    def __init__(self, model: nn.Module):
        targets = [m for n, m in model.named_modules() if n in ("token_embedding", "visual.conv1")]
        self.handles = [m.register_forward_hook(lambda _m, _i, out: out.detach().requires_grad_(True))
                        for m in targets]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run_step_benchmark(cfg: StepBenchConfig, progress: Callable[[str], None] = print) -> dict:
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    loaded = load_model(f"{cfg.arch}@random", device=device, seed=cfg.seed)
    model = loaded.model
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    labels = (torch.arange(cfg.batch_size) % cfg.num_classes).to(device)
    prompts = ClassPrompts.build(loaded.tokenizer, [f"class {i}" for i in range(cfg.num_classes)]).to(device)
    eligible = Eligibility().select(model)

    progress(f"scoring a one-batch |grad| mask at density {cfg.density} ...")
    mask = select_mask(importance_scores(model, [(images, labels)], prompts, progress=False), cfg.density)
    params = list(eligible.values())

    def trainable(flag: bool) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(flag)

    full_opt = torch.optim.AdamW(params, lr=cfg.lr)
    masked_opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    dense_masks = {n: mask.to_dense(n).to(device) for n in eligible}
    update = SparseUpdate(mask, device=device)
    saft_opt = torch.optim.AdamW(list(update.values), lr=cfg.lr)

    def full_step():
        trainable(True)
        full_opt.zero_grad(set_to_none=True)
        classification_loss(model, images, labels, prompts)[0].backward()
        full_opt.step()
        return _tensor_bytes(p.grad for p in params) + _optimizer_bytes(full_opt)

    def masked_step():  # the naive way: dense gradients and optimizer, gradients masked
        trainable(True)
        masked_opt.zero_grad(set_to_none=True)
        classification_loss(model, images, labels, prompts)[0].backward()
        for n, p in eligible.items():
            if p.grad is not None:
                p.grad.mul_(dense_masks[n])
        masked_opt.step()
        return _tensor_bytes(p.grad for p in params) + _optimizer_bytes(masked_opt)

    def saft_step():
        trainable(False)
        saft_opt.zero_grad(set_to_none=True)
        with update.attached(model):
            loss = classification_loss(model, images, labels, prompts)[0]
        loss.backward()
        saft_opt.step()
        return _tensor_bytes(v.grad for v in update.values) + _optimizer_bytes(saft_opt)

    def floor_step():  # forward + input-gradient backward only
        trainable(False)
        hooks = _InputGradHooks(model)
        try:
            classification_loss(model, images, labels, prompts)[0].backward()
        finally:
            hooks.remove()
        return 0

    steps = {"full": full_step, "masked_dense": masked_step, "saft": saft_step, "floor": floor_step}
    cleanup = {"full": full_opt.state.clear, "masked_dense": masked_opt.state.clear,
               "saft": saft_opt.state.clear, "floor": lambda: None}
    results: dict[str, dict] = {m: {"step_times_s": []} for m in METHODS}
    rounds = cfg.warmup + cfg.repeats
    # One method at a time, each holding only its own training state, as a user's run
    # would; ratios are only meaningful on an otherwise idle machine.
    for method in METHODS:
        for r in range(rounds):
            progress(f"{method}: step {r + 1}/{rounds}{' (warm-up)' if r < cfg.warmup else ''} ...")
            for p in params:
                p.grad = None
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            state = steps[method]()
            _sync(device)
            if r >= cfg.warmup:
                results[method]["step_times_s"].append(time.perf_counter() - t0)
            results[method]["state_bytes"] = state
            if device.type == "cuda":
                results[method]["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        cleanup[method]()
        for p in params:
            p.grad = None
    trainable(True)

    for r in results.values():
        r["step_time_s"] = statistics.median(r["step_times_s"])
    full_t, full_b = results["full"]["step_time_s"], results["full"]["state_bytes"]
    ratios = {m: {"step_time": results[m]["step_time_s"] / full_t,
                  "state_bytes": results[m]["state_bytes"] / full_b} for m in METHODS}
    return {
        "config": cfg.__dict__,
        "environment": environment(device, threads=torch.get_num_threads()),
        "mask": mask_summary(mask),
        "methods": results,
        "ratios_vs_full": ratios,
        "saft_vs_floor": results["saft"]["step_time_s"] / results["floor"]["step_time_s"],
    }


def format_step_benchmark(report: dict) -> str:
    cfg, mask = report["config"], report["mask"]
    lines = [
        f"{cfg['arch']} random init, {cfg['image_size']} px, batch {cfg['batch_size']}, "
        f"{cfg['num_classes']} class prompts, device {report['environment']['device']}, "
        f"{report['environment']['threads']} threads",
        f"mask: {mask['num_selected']} of {mask['eligible']} entries in "
        f"{mask['tensors_with_selection']} of {mask['tensors_eligible']} tensors",
        f"{'method':<14}{'step time (s)':>15}{'x full':>9}{'state (MB)':>13}{'x full':>9}",
    ]
    for m, r in report["methods"].items():
        q = report["ratios_vs_full"][m]
        lines.append(f"{m:<14}{r['step_time_s']:>15.3f}{q['step_time']:>9.3f}"
                     f"{r['state_bytes'] / 2**20:>13.2f}{q['state_bytes']:>9.4f}")
    lines.append(f"saft / floor step time: {report['saft_vs_floor']:.3f}")
    return "\n".join(lines)
