"""Per-step time and training state of SAFT against full fine-tuning, PEFT and the floor, in one process.

Every method trains the same model (PEFT methods a copy of its weights) on the same batch
and loss, the step the trainer runs (:func:`saft.sparse.trainer.finetune`): class
embeddings from :class:`saft.sparse.text_side.StepTextSide` (one graph when the prompts
fit a text chunk, else encoded without a graph and re-encoded chunk by chunk for the
backward), cross-entropy over ``logit_scale * cos``, backward, AdamW. Rounds are
interleaved: each round runs one step of every method, in an order rotated from round to
round, so a change in the machine's load hits every method alike; the median over the
timed rounds is reported, with each method's spread, and a warning when rounds vary
widely.

``floor`` is the cost no weight-sparse method can beat: the same step with no weight
gradient and no optimizer (forward plus the input-gradient backward through every layer).
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from saft.bench import step_peft
from saft.models import load_model
from saft.sparse.mask import select_mask
from saft.sparse.objective import ClassPrompts, auto_text_batch, clip_logits
from saft.sparse.scores import Eligibility, importance_scores
from saft.sparse.text_side import StepTextSide
from saft.sparse.update import SparseUpdate
from saft.sparse.value_grad import STRATEGIES, forced_strategy

METHODS = ("full", "masked_dense", "saft", "floor", "lora", "shira")
PEFT_METHODS = ("lora", "shira")
PRECISIONS = ("fp32", "bf16")
SPREAD_WARNING = 0.25
"""A method whose timed rounds spread more than this fraction of their median makes the report warn."""
FLOOR_TARGET = 1.10
"""SAFT's step time target, as a multiple of the floor (issue 26)."""


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
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    text_batch: int = 0  # prompts per text chunk; 0: the trainer's automatic size for the batch
    peft: bool = True  # LoRA and SHiRA when peft is importable
    lora_rank: int = 8
    value_grads: list[str] = field(default_factory=list)  # extra saft rows with a forced strategy

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("batch_size", "num_classes", "repeats", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        auto_text_batch(self.text_batch, self.batch_size)  # validates text_batch
        self.value_grads = list(self.value_grads)
        for s in self.value_grads:
            if s not in STRATEGIES:
                raise ValueError(f"value-gradient strategy must be one of {', '.join(STRATEGIES)}, got {s!r}")


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(_tensor_bytes(s.values()) for s in opt.state.values())


def environment(device: torch.device, **extra) -> dict:
    """What a step benchmark ran on: torch, the machine and the device (plus ``extra``)."""
    # the setting `import saft` makes (saft/__init__.py): it moves frozen attention's CPU bf16 times
    return {"torch": torch.__version__, **extra, "machine": platform.machine(), "processor": platform.processor(),
            "torch_linear_flatten_3d": os.environ.get("TORCH_LINEAR_FLATTEN_3D"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def mask_summary(mask) -> dict:
    """The mask's counts a step benchmark reports (not its per-tensor table)."""
    stats = mask.stats()
    return {k: stats[k] for k in ("num_selected", "eligible", "tensors_with_selection", "tensors_eligible")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on every platform
        return None


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


@dataclass
class _Method:
    """One method's step: its model, trainable tensors, optimizer and forward context."""

    model: nn.Module
    params: list[torch.Tensor]
    opt: torch.optim.Optimizer | None
    context: Callable[[], contextlib.AbstractContextManager]
    text_side: StepTextSide
    entries: int
    before: Callable[[], None] = lambda: None  # after zero_grad (flags, hooks)
    after_backward: Callable[[], None] = lambda: None
    after: Callable[[], None] = lambda: None
    info: dict = field(default_factory=dict)


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
    text_batch = auto_text_batch(cfg.text_batch, cfg.batch_size)
    amp = torch.bfloat16 if cfg.precision == "bf16" else None

    progress(f"scoring a one-batch |grad| mask at density {cfg.density} ...")
    mask = select_mask(importance_scores(model, [(images, labels)], prompts, progress=False), cfg.density)
    params = list(eligible.values())
    peft_version = step_peft.peft_version() if cfg.peft else None
    # PEFT copies are made before any method trains, so they start from the same weights
    peft_models = {}
    if peft_version:
        progress(f"peft {peft_version}: LoRA r={cfg.lora_rank} and SHiRA on copies of the model ...")
        peft_models["lora"] = step_peft.lora_model(model, cfg.lora_rank)
        peft_models["shira"] = step_peft.shira_model(model, mask.num_selected, seed=cfg.seed)

    def autocast():
        return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)

    def text_side(m: nn.Module, context) -> StepTextSide:
        return StepTextSide(m, prompts, trains=True, text_batch=text_batch, context=context)

    def trainable(flag: bool) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(flag)

    methods: dict[str, _Method] = {}
    methods["full"] = _Method(model, params, torch.optim.AdamW(params, lr=cfg.lr), autocast,
                              text_side(model, autocast), sum(p.numel() for p in params),
                              before=lambda: trainable(True))
    dense_masks = {n: mask.to_dense(n).to(device) for n in eligible}

    def apply_masks():  # the naive way: dense gradients and optimizer, gradients masked
        for n, p in eligible.items():
            if p.grad is not None:
                p.grad.mul_(dense_masks[n])

    methods["masked_dense"] = _Method(model, params, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0),
                                      autocast, text_side(model, autocast), mask.num_selected,
                                      before=lambda: trainable(True), after_backward=apply_masks)
    for strategy in ["auto"] + cfg.value_grads:
        update = SparseUpdate(mask, device=device)

        def attached(update=update, strategy=strategy):
            stack = contextlib.ExitStack()
            stack.enter_context(forced_strategy(strategy))
            stack.enter_context(update.attached(model))
            stack.enter_context(autocast())
            return stack

        name = "saft" if strategy == "auto" else f"saft[{strategy}]"
        methods[name] = _Method(model, list(update.values), torch.optim.AdamW(list(update.values), lr=cfg.lr),
                                attached, text_side(model, attached), mask.num_selected,
                                before=lambda: trainable(False), info={"value_grad": strategy})
    hooks: list[_InputGradHooks] = []

    def floor_before():
        trainable(False)
        hooks.append(_InputGradHooks(model))

    methods["floor"] = _Method(model, [], None, autocast, text_side(model, autocast), 0,
                               before=floor_before, after=lambda: hooks.pop().remove())
    for name, (m, m_params, info) in peft_models.items():
        methods[name] = _Method(m, m_params, torch.optim.AdamW(m_params, lr=cfg.lr), autocast,
                                text_side(m, autocast), sum(p.numel() for p in m_params), info=info)

    def step(method: _Method) -> int:
        if method.opt is not None:
            method.opt.zero_grad(set_to_none=True)
        method.before()
        try:
            text = method.text_side.begin()
            with method.context():
                loss = F.cross_entropy(clip_logits(method.model, images, text).float(), labels)
            loss.backward()
            method.text_side.finish()
        finally:
            method.after()
        method.after_backward()
        if method.opt is None:
            return 0
        method.opt.step()
        state = _tensor_bytes(p.grad for p in method.params) + _optimizer_bytes(method.opt)
        method.opt.zero_grad(set_to_none=True)  # hold only the optimizer state between steps
        return state

    names = list(methods)
    results: dict[str, dict] = {m: {"step_times_s": []} for m in names}
    rounds = cfg.warmup + cfg.repeats
    load_before = _load()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        progress(f"round {r + 1}/{rounds}{' (warm-up)' if r < cfg.warmup else ''}: {', '.join(order)} ...")
        for name in order:
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            state = step(methods[name])
            _sync(device)
            seconds = time.perf_counter() - t0
            res = results[name]
            if r >= cfg.warmup:
                res["step_times_s"].append(seconds)
            res["state_bytes"] = state
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                res["peak_allocated_bytes"] = max(res.get("peak_allocated_bytes", 0), peak)
    load_after = _load()
    trainable(True)

    for name, res in results.items():
        times = res["step_times_s"]
        res["step_time_s"] = statistics.median(times)
        res["spread"] = (max(times) - min(times)) / res["step_time_s"] if res["step_time_s"] else 0.0
        res["trainable_entries"] = methods[name].entries
        res.update(methods[name].info)
    full_t, full_b = results["full"]["step_time_s"], results["full"]["state_bytes"]
    floor_t = results["floor"]["step_time_s"]
    ratios = {m: {"step_time": results[m]["step_time_s"] / full_t,
                  "state_bytes": results[m]["state_bytes"] / full_b} for m in names}
    vs_floor = {m: results[m]["step_time_s"] / floor_t for m in names}
    # the same ratio from each round's adjacent steps, then the median: a load that drifts over
    # minutes cancels within a round, so this one is the steadier on a busy machine
    paired = {m: statistics.median(t / f for t, f in zip(results[m]["step_times_s"], results["floor"]["step_times_s"]))
              for m in names}
    unsteady = [f"{m} {r['spread']:.0%}" for m, r in results.items() if r["spread"] > SPREAD_WARNING]
    warnings = [f"rounds vary widely (spread of the timed steps over their median, > {SPREAD_WARNING:.0%}: "
                f"{', '.join(unsteady)}): the machine was busy; rerun on an idle machine before trusting the "
                "ratios"] if unsteady else []
    saft_t = results["saft"]["step_time_s"]
    targets = {"saft_vs_floor_max": FLOOR_TARGET, "saft_at_floor": vs_floor["saft"] <= FLOOR_TARGET}
    for m in PEFT_METHODS:
        if m in results:
            targets[f"saft_faster_than_{m}"] = saft_t < results[m]["step_time_s"]
    return {
        "config": cfg.__dict__,
        "environment": environment(device, threads=torch.get_num_threads(), peft=peft_version,
                                   load_avg_before=load_before, load_avg_after=load_after),
        "text_side": {"prompts": prompts.n_prompts, "text_batch": text_batch,
                      "chunked": prompts.n_prompts > text_batch},
        "mask": mask_summary(mask),
        "methods": results,
        "ratios_vs_full": ratios,
        "ratios_vs_floor": vs_floor,
        "ratios_vs_floor_per_round": paired,
        "saft_vs_floor": vs_floor["saft"],
        "targets": targets,
        "peak_memory": "CUDA peak allocation per step" if device.type == "cuda" else
                       "not reported: the CPU has no per-step peak counter",
        "skipped": [] if peft_version else [f"{m} (peft is not installed: pip install -r requirements-dev.txt)"
                                           if cfg.peft else f"{m} (--no-peft)" for m in PEFT_METHODS],
        "warnings": warnings,
    }


def format_step_benchmark(report: dict) -> str:
    cfg, mask, env = report["config"], report["mask"], report["environment"]
    text = report.get("text_side", {})
    cuda = any("peak_allocated_bytes" in r for r in report["methods"].values())
    lines = [
        f"{cfg['arch']} random init, {cfg['image_size']} px, batch {cfg['batch_size']}, "
        f"{cfg['num_classes']} class prompts ({'chunks of ' + str(text['text_batch']) if text.get('chunked') else 'one graph'}), "
        f"{cfg.get('precision', 'fp32')}, device {env['device']}, {env['threads']} threads, load {env.get('load_avg_before')}",
        f"mask: {mask['num_selected']} of {mask['eligible']} entries in "
        f"{mask['tensors_with_selection']} of {mask['tensors_eligible']} tensors",
        f"{'method':<16}{'step (s)':>10}{'spread':>8}{'x full':>8}{'x floor':>9}{'(rounds)':>9}{'entries':>13}"
        f"{'state (MB)':>12}"
        + (f"{'peak (MB)':>11}" if cuda else ""),
    ]
    for m, r in report["methods"].items():
        lines.append(f"{m:<16}{r['step_time_s']:>10.3f}{r.get('spread', 0):>8.0%}"
                     f"{report['ratios_vs_full'][m]['step_time']:>8.3f}{report['ratios_vs_floor'][m]:>9.3f}"
                     f"{report.get('ratios_vs_floor_per_round', {}).get(m, float('nan')):>9.3f}"
                     f"{r.get('trainable_entries', 0):>13,}{r['state_bytes'] / 2**20:>12.2f}"
                     + (f"{r.get('peak_allocated_bytes', 0) / 2**20:>11.0f}" if cuda else ""))
    t = report["targets"]
    line = f"saft / floor: {report['saft_vs_floor']:.3f} (target <= {t['saft_vs_floor_max']:.2f}: " \
           f"{'met' if t['saft_at_floor'] else 'NOT met'}; median of the rounds' own ratios " \
           f"{report['ratios_vs_floor_per_round']['saft']:.3f})"
    for m in PEFT_METHODS:
        if f"saft_faster_than_{m}" in t:
            line += f"; faster than {m}: {'yes' if t[f'saft_faster_than_{m}'] else 'NO'}"
    lines.append(line)
    lines += [f"skipped: {s}" for s in report.get("skipped", [])]
    lines += [f"WARNING: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)
