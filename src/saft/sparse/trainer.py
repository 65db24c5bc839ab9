"""One trainer for the methods users compare: ``saft``, ``random``, ``full``, ``lora`` and ``lpft``.

``saft`` and ``random`` train only the values of a mask (a ``SparseUpdate``); ``full`` is
conventional fine-tuning of every eligible parameter; ``lora`` trains PEFT adapters;
``lpft`` trains a linear probe, then everything with it. What each trains is its
:class:`~saft.sparse.methods.Training`; the loss, data order, schedule and optimizer are
the same for all. All return a ``Delta`` and leave the model as it was given (the base),
so a result is always "base + delta".

Runs are deterministic for a seed: the batch order is a function of (seed, epoch), and
a checkpoint holds the trainable tensors, optimizer, schedule and RNG state, so a run
resumed after a kill ends bit-identical to an uninterrupted one (on the same device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from saft.progress import progress_bar

from saft.sparse.config import FinetuneConfig
from saft.models.fingerprint import fingerprint_model
from saft.sparse.backends import configure_backends
from saft.sparse.checkpoint import CHECKPOINT_NAME, read_checkpoint, save_checkpoint
from saft.sparse.delta import Delta
from saft.sparse.distributed import SINGLE, Dist
from saft.sparse.mask import Mask
from saft.sparse.methods import start_training
from saft.sparse.objective import ClassPrompts, auto_text_batch, clip_logits
from saft.sparse.text_side import StepTextSide
from saft.version import __version__

@dataclass
class FinetuneResult:
    delta: Delta
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    seconds: float = 0.0


class RankPart:
    """This rank's equal part of every batch of a batch sampler (the whole batch for one process)."""

    def __init__(self, batches, dist: Dist):
        self.batches, self.dist = batches, dist

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield list(self.dist.part(batch)) if self.dist.active else batch


class StreamBatches:
    """Micro-batches ``start..stop`` of an endless stream of seeded epoch permutations."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int):
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop

    def _epoch(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        cache: dict[int, torch.Tensor] = {}
        for m in range(self.start, self.stop):
            out = []
            for pos in range(m * self.batch_size, (m + 1) * self.batch_size):
                epoch, offset = divmod(pos, self.n)
                if epoch not in cache:
                    cache.clear()
                    cache[epoch] = self._epoch(epoch)
                out.append(int(cache[epoch][offset]))
            yield out


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup, then cosine decay to zero at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _freeze_norm_statistics(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def finetune(
    model: nn.Module,
    dataset: Dataset,
    prompts: ClassPrompts,
    *,
    config: FinetuneConfig | None = None,
    mask: Mask | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    meta: dict[str, str] | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
    dist: Dist = SINGLE,
) -> FinetuneResult:
    """Fine-tune and return the delta; the model is left at its base weights.

    ``dataset`` yields ``(image_tensor, label)``. ``mask`` is required for ``saft`` and
    ``random`` (see ``select_mask`` / ``random_mask``) and refused for the other methods;
    ``lpft`` names its head's rows by ``prompts.class_names``. ``callback`` receives each step's
    record (loss, lr, grad_norm, images/s) after the optimizer step. Under ``dist``
    (several processes, :mod:`saft.sparse.distributed`) each rank trains on its part of
    every global batch and gradients are summed, so every rank ends with the delta one
    process would train with the same global batch (up to fp32 rounding); only rank 0
    writes checkpoints, calls ``callback`` and shows progress.
    """
    cfg = (config or FinetuneConfig()).for_data(len(dataset))
    if dist.active and cfg.batch_size % dist.world:
        raise ValueError(f"batch_size {cfg.batch_size} must divide by the {dist.world} processes: each trains on an "
                         f"equal part of every global batch (e.g. --batch-size {cfg.batch_size // dist.world * dist.world or dist.world})")
    if cfg.needs_mask and mask is None:
        raise ValueError(f"method {cfg.method!r} trains a mask: pass mask=select_mask(...) or random_mask(...)")
    if len(dataset) == 0:
        raise ValueError("the training set is empty")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if resume and ckpt_path is None:
        raise ValueError("resume=True needs checkpoint_dir")
    base_fp = fingerprint_model(model)
    if mask is not None and mask.meta.get("base_fingerprint", base_fp) != base_fp:
        # Same shapes do not make the same model: a mask scored on other weights picks
        # entries that mean nothing here, and the delta would carry this base's fingerprint.
        raise ValueError(f"the mask was scored on another base model ({mask.meta.get('base_model', 'unknown')}, "
                         f"fingerprint {mask.meta['base_fingerprint'][:12]}); score again for this model")
    labels_used = getattr(dataset, "class_names", None)  # ManifestDataset: label -> class name
    if labels_used and max(labels_used) >= prompts.n_classes:
        raise ValueError(f"the training set uses label {max(labels_used)} ({labels_used[max(labels_used)]!r}) but "
                         f"the prompts cover {prompts.n_classes} class(es); the manifest and the class list "
                         "do not belong together")
    amp_dtype = _autocast_dtype(cfg.precision, device)
    configure_backends(device, autocast=amp_dtype is not None)
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training

    for p in model.parameters():
        p.requires_grad_(False)
    try:
        training = start_training(cfg, model, mask=mask, device=device, dataset=dataset, prompts=prompts,
                                  amp_dtype=amp_dtype, loader_kwargs=lambda: cfg.loader.kwargs(device, cfg.seed))
    except BaseException:
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
        raise
    params, text_trains = training.params, training.text_trains

    t0 = time.perf_counter()
    try:
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: cosine_with_warmup(s, cfg.steps, min(cfg.warmup_steps, cfg.steps))
        )
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        history: list[dict] = []
        start_step = 0
        config_json = json.dumps(cfg.to_dict(), sort_keys=True)
        if resume and ckpt_path is not None and ckpt_path.is_file():
            start_step, history = _load_checkpoint(ckpt_path, params, optimizer, scheduler, scaler, config_json, base_fp)
        if dist.active and dist.sum_int(start_step, device) != start_step * dist.world:
            raise ValueError(f"{ckpt_path}: the processes resume from different steps; the checkpoint folder must be "
                             "one folder all of them see (a shared volume on several nodes)")
        last_saved: int | None = start_step if start_step else None  # step of the checkpoint on disk, if any

        model.train()
        if not training.updates_norm_statistics:
            _freeze_norm_statistics(model)
        loader = DataLoader(
            dataset,
            batch_sampler=RankPart(StreamBatches(len(dataset), cfg.batch_size, cfg.seed,
                                                 start_step * cfg.grad_accum, cfg.steps * cfg.grad_accum), dist),
            **cfg.loader.kwargs(device, cfg.seed),
        )
        prompts = prompts.to(device)

        def forward_context():
            stack = contextlib.ExitStack()
            stack.enter_context(training.attached())
            stack.enter_context(torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                               enabled=amp_dtype is not None))
            return stack

        # each rank's image batch is its part of the global batch: size the text chunks to that
        text_prompts = auto_text_batch(cfg.text_batch, max(1, cfg.batch_size // dist.world))
        text_side = StepTextSide(model, prompts, trains=text_trains, text_batch=text_prompts,
                                 context=forward_context, dist=dist)
        bar = progress_bar(total=cfg.steps, initial=start_step, desc=f"finetune[{cfg.method}]", unit="step",
                           enabled=progress and dist.is_main)
        batches = iter(loader)
        for step in range(start_step, cfg.steps):
            t_step = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, correct, seen = 0.0, 0, 0
            try:
                text = text_side.begin()
                for _ in range(cfg.grad_accum):
                    images, labels = next(batches)
                    images = images.to(device, non_blocking=True)
                    labels = labels.to(device, non_blocking=True)
                    with forward_context():
                        logits = clip_logits(model, images, training.head(text))
                        if dist.active:  # this rank's part of the global batch's mean
                            loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
                            loss = loss / cfg.batch_size
                        else:
                            loss = nn.functional.cross_entropy(logits.float(), labels)
                    loss_value = float(loss.detach())
                    if dist.active:  # every rank stops together, or the others would wait forever
                        loss_value = math.nan if dist.sum_int(not math.isfinite(loss_value), device) else \
                            loss_value * cfg.batch_size / labels.numel()
                    # Stop before backward: a NaN/inf loss would poison the values and the
                    # optimizer state, and the next checkpoint would overwrite the last good one.
                    if not math.isfinite(loss_value):
                        raise TrainingDivergedError(step + 1, "the loss", loss_value, cfg, ckpt_path, last_saved)
                    scaler.scale(loss / cfg.grad_accum).backward()
                    loss_sum += loss_value * labels.numel()
                    correct += int((logits.argmax(-1) == labels).sum())
                    seen += labels.numel()
                text_side.finish()  # the text tower's share of the step's backward
                dist.all_reduce_grads(params)
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise BatchOutOfMemoryError(
                        f"out of memory in training step {step + 1} on {device} with batch size {cfg.batch_size} "
                        f"(grad_accum {cfg.grad_accum}). {_batch_hint(cfg)}"
                    ) from exc
                raise
            if dist.active:
                totals = dist.all_reduce(torch.tensor([loss_sum, correct, seen], dtype=torch.float64,
                                                      device=dist.comm_device(device)))
                loss_sum, correct, seen = float(totals[0]), int(totals[1]), int(totals[2])
            scaler.unscale_(optimizer)
            grad_norm = _clip(params, cfg.max_grad_norm)
            # With fp16 loss scaling an inf gradient is routine (the scaler skips that step);
            # otherwise it means the step would write inf/NaN into the trained values.
            if not math.isfinite(grad_norm) and not scaler.is_enabled():
                raise TrainingDivergedError(step + 1, "the gradient norm", grad_norm, cfg, ckpt_path, last_saved)
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            record = {"step": step + 1, "loss": loss_sum / seen, "train_acc": correct / seen, "lr": lr,
                      "grad_norm": grad_norm, "images_per_s": seen / max(time.perf_counter() - t_step, 1e-9)}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", ips=f"{record['images_per_s']:.1f}")
            bar.update(1)
            if ckpt_path and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                if not all(bool(torch.isfinite(p).all()) for p in params):  # never save a poisoned state
                    raise TrainingDivergedError(step + 1, "a trained value", math.nan, cfg, ckpt_path, last_saved)
                if dist.is_main:
                    _save_checkpoint(ckpt_path, step + 1, params, optimizer, scheduler, scaler, config_json, base_fp,
                                     history)
                dist.barrier()  # nobody runs ahead of a checkpoint that may be resumed from
                last_saved = step + 1
            if callback is not None and dist.is_main:
                callback(record)
        bar.close()
    finally:
        training.close()  # leave the base in place whatever happened
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
        model.train(was_training)

    info = {"method": cfg.method, "steps": str(cfg.steps), "lr": repr(cfg.learning_rate),
            "config": config_json, "library_version": __version__}
    if getattr(model, "saft_model_spec", None):
        info["base_model"] = model.saft_model_spec
    info.update(prompts.meta())
    if mask is not None:
        info.update({f"mask_{k}": v for k, v in mask.meta.items()})
    info.update(meta or {})
    delta = training.delta(base_fp, info)
    return FinetuneResult(delta, history, cfg.to_dict(), time.perf_counter() - t0)


class TrainingDivergedError(RuntimeError):
    """The loss (or the gradient, or a trained value) became NaN or infinite: training stopped.

    Raised before that step touches the optimizer or any checkpoint, so the checkpoint on
    disk (``checkpoint_step``, None when none was written) is the last good state.
    """

    def __init__(self, step: int, what: str, value: float, cfg: FinetuneConfig, ckpt_path: Path | None,
                 checkpoint_step: int | None) -> None:
        self.step, self.value, self.checkpoint_step = step, value, checkpoint_step
        if checkpoint_step is not None:
            kept = (f"The last good checkpoint (step {checkpoint_step}) is kept in {ckpt_path}: --resume continues "
                    "from it with the same settings (e.g. after fixing the data); changed settings need a fresh "
                    "checkpoint folder.")
        else:
            kept = "No checkpoint was written before this step."
        super().__init__(
            f"training diverged at step {step}: {what} is {value} (not finite). {kept} To try: a lower learning "
            f"rate (now {cfg.learning_rate:g}, --lr), --precision fp32 (now {cfg.precision}), gradient clipping "
            f"(--max-grad-norm, now {cfg.max_grad_norm}), and check the images for NaN/inf values."
        )


class BatchOutOfMemoryError(RuntimeError):
    """A batch did not fit in memory; the message names the batch size and how to lower it."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS out-of-memory errors and CPU allocation failures."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "DefaultCPUAllocator" in text)


def _batch_hint(cfg: FinetuneConfig) -> str:
    smaller = max(1, cfg.batch_size // 2)
    return (f"Lower it with --batch-size {smaller} (finetune.batch_size in params.yaml) and keep the effective "
            f"batch of {cfg.batch_size * cfg.grad_accum} with --grad-accum {cfg.grad_accum * cfg.batch_size // smaller}"
            "; on a GPU, --precision bf16 or fp16 also halves activation memory; with many classes and a trained text "
            f"tower, a smaller --text-batch (now {cfg.text_prompts} prompts) bounds the text side. A changed batch size starts a "
            "fresh run (a checkpoint resumes only with the same settings).")


def _clip(params: list[torch.Tensor], max_norm: float | None) -> float:
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))


def _save_checkpoint(path, step, params, optimizer, scheduler, scaler, config_json, base_fp, history) -> None:
    save_checkpoint(path, {
        "step": step,
        "params": [p.detach().cpu() for p in params],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "config": config_json,
        "base_fingerprint": base_fp,
        "history": history,
    })


def config_difference(saved: str, now: str) -> str:
    """The settings two config JSON documents disagree on, as ``key: saved -> now`` (for a refused resume)."""
    try:
        a, b = json.loads(saved), json.loads(now)
    except ValueError:
        return "the saved configuration cannot be read"
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in keys) or "none"


def _load_checkpoint(path, params, optimizer, scheduler, scaler, config_json, base_fp):
    state = read_checkpoint(path)
    if not {"config", "base_fingerprint", "params"} <= state.keys():
        raise ValueError(f"{path}: not a SAFT training checkpoint; delete it to start fresh")
    if state["config"] != config_json:
        raise ValueError(
            f"{path}: the checkpoint was written with other settings ({config_difference(state['config'], config_json)}); "
            "resume only with the same settings, or start fresh in an empty checkpoint folder"
        )
    if state["base_fingerprint"] != base_fp:
        raise ValueError(f"{path}: checkpoint belongs to another base model (fingerprint mismatch)")
    if len(state["params"]) != len(params) or any(
        a.shape != b.shape for a, b in zip(state["params"], params)
    ):
        raise ValueError(f"{path}: checkpoint tensors do not match this run's mask or model")
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved.to(p.device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"]), list(state["history"])
