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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(step: Callable[[], None], cfg: StepBenchConfig, device: torch.device) -> list[float]:
    for _ in range(cfg.warmup):
        step()
    times = []
    for _ in range(cfg.repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


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
    results: dict[str, dict] = {}

    def set_trainable(names) -> None:
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
            p.grad = None

    # full fine-tuning
    progress("timing full ...")
    set_trainable(eligible)
    opt = torch.optim.AdamW([p for p in eligible.values()], lr=cfg.lr)

    def full_step():
        opt.zero_grad(set_to_none=True)
        classification_loss(model, images, labels, prompts)[0].backward()
        opt.step()

    base = {n: p.detach().clone() for n, p in eligible.items()}
    times = _time_steps(full_step, cfg, device)
    results["full"] = {"step_times_s": times,
                       "state_bytes": _tensor_bytes(p.grad for p in eligible.values()) + _optimizer_bytes(opt)}

    # naive masked SAFT: dense gradients and optimizer, gradients multiplied by the mask
    progress("timing masked_dense ...")
    with torch.no_grad():
        for n, p in eligible.items():
            p.copy_(base[n])
    dense_masks = {n: mask.to_dense(n).to(device) for n in eligible}
    opt = torch.optim.AdamW([p for p in eligible.values()], lr=cfg.lr, weight_decay=0.0)

    def masked_step():
        opt.zero_grad(set_to_none=True)
        classification_loss(model, images, labels, prompts)[0].backward()
        for n, p in eligible.items():
            if p.grad is not None:
                p.grad.mul_(dense_masks[n])
        opt.step()

    times = _time_steps(masked_step, cfg, device)
    results["masked_dense"] = {"step_times_s": times,
                               "state_bytes": _tensor_bytes(p.grad for p in eligible.values()) + _optimizer_bytes(opt)}
    del dense_masks

    # ours: values only
    progress("timing saft ...")
    with torch.no_grad():
        for n, p in eligible.items():
            p.copy_(base[n])
    set_trainable(())
    update = SparseUpdate(mask, device=device)
    opt = torch.optim.AdamW(list(update.values), lr=cfg.lr)

    def saft_step():
        opt.zero_grad(set_to_none=True)
        with update.attached(model):
            loss = classification_loss(model, images, labels, prompts)[0]
        loss.backward()
        opt.step()

    times = _time_steps(saft_step, cfg, device)
    results["saft"] = {"step_times_s": times,
                       "state_bytes": _tensor_bytes(v.grad for v in update.values) + _optimizer_bytes(opt)}

    # the floor: forward + input-gradient backward
    progress("timing floor ...")
    hooks = _InputGradHooks(model)

    def floor_step():
        classification_loss(model, images, labels, prompts)[0].backward()

    times = _time_steps(floor_step, cfg, device)
    hooks.remove()
    results["floor"] = {"step_times_s": times, "state_bytes": 0}

    for r in results.values():
        r["step_time_s"] = statistics.median(r["step_times_s"])
    full_t, full_b = results["full"]["step_time_s"], results["full"]["state_bytes"]
    ratios = {m: {"step_time": results[m]["step_time_s"] / full_t,
                  "state_bytes": results[m]["state_bytes"] / full_b} for m in METHODS}
    stats = mask.stats()
    return {
        "config": cfg.__dict__,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "machine": platform.machine(), "processor": platform.processor(),
                        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
        "mask": {"num_selected": stats["num_selected"], "eligible": stats["eligible"],
                 "tensors_with_selection": stats["tensors_with_selection"],
                 "tensors_eligible": stats["tensors_eligible"]},
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
