"""The text side at ImageNet scale: today's path vs the one the library takes, in one run.

Setting: an open_clip architecture (ViT-B-16 by default, random init: the cost does not
depend on the weights), 224 px images, ImageNet's 1000 class names and CLIP's 80
templates. Three measurements, each in a fresh spawned process (peak memory is per
process):

(a) **a scoring pass** of N batches. *Ours*: the training prompt (one template), class
    embeddings encoded once without a graph, the image side run with them as a leaf, one
    chunked backward through the text tower at the end. Its phases are timed inside the
    same run, so the ratio ``pass / (image side + one text forward and backward)`` is
    measured, not estimated. *Before*: every batch ran all class x template prompts,
    padded to 77 tokens, through the text tower in the same graph as the image side.
(b) **a training step** (SAFT values at a random mask of density 0.001 over both
    towers, AdamW). *Ours* at 10 and at 1000 classes: the peak memory ratio is the
    class-count cost. *Before*: one graph per step over all prompts at 77 tokens.
(c) **the text encoding alone**: a sample of ImageNet's 80,000 prompts, at 77 tokens and
    cut to each chunk's longest prompt, extrapolated to all 80,000.

Where the old path cannot run (80,000 prompts with autograd hold terabytes of
activations) it is measured at a few class counts and extrapolated linearly in the
class count (its cost is linear in the number of prompts); extrapolated figures are
marked as such. Peak memory: CUDA's peak allocation on a GPU; on the CPU the process's
peak resident set during the measured call (``VmHWM`` after a reset through
``/proc/self/clear_refs``), which includes the model's weights as CUDA's figure does.
"""

from __future__ import annotations

import multiprocessing
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

TARGETS = {"train_peak_ratio": 1.3, "scoring_ratio": 1.2, "text_speedup": 2.5}


@dataclass
class ScaleBenchConfig:
    arch: str = "ViT-B-16"
    image_size: int = 224
    batch_size: int = 4
    score_batches: int = 16
    classes: int = 1000
    small_classes: int = 10
    old_class_counts: list[int] = field(default_factory=lambda: [1, 2])
    old_score_batches: int = 2
    text_sample_classes: int = 8
    text_batch: int = 0  # 0: the library's automatic size (8 prompts per image)
    density: float = 0.001
    warmup: int = 1
    device: str = "cpu"
    threads: int = 0  # torch threads in each measuring process; 0: torch's default
    seed: int = 0
    isolate: bool = True  # each measurement in a fresh process (False: in this one, for tests)

    def __post_init__(self) -> None:
        if min(self.batch_size, self.score_batches, self.classes, self.small_classes, self.text_sample_classes,
               self.old_score_batches) < 1 or self.text_batch < 0 or not self.old_class_counts:
            raise ValueError("batch sizes, counts and class numbers must be >= 1")


# --- measuring, inside a spawned process -----------------------------------------------------


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass


def _peak(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(device, fn):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, _peak(device), out


def _setup(cfg: dict):
    import open_clip
    import torch

    from saft.models import load_model

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    loaded = load_model(f"{cfg['arch']}@random", device=device, seed=cfg["seed"])
    names = list(open_clip.IMAGENET_CLASSNAMES)
    templates = [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    return torch, device, loaded, names, templates


def _images(torch, cfg: dict, n_classes: int, batches: int, device):
    gen = torch.Generator().manual_seed(cfg["seed"])
    out = []
    for b in range(batches):
        images = torch.randn(cfg["batch_size"], 3, cfg["image_size"], cfg["image_size"], generator=gen)
        labels = (torch.arange(cfg["batch_size"]) + b * cfg["batch_size"]) % n_classes
        out.append((images.to(device), labels.to(device)))
    return out


def _spread(names: list[str], n: int) -> list[str]:
    """``n`` class names spread over the list (every part of ImageNet's vocabulary represented)."""
    step = len(names) / n
    return [names[int(i * step)] for i in range(n)]


def _old_class_embeddings(model, prompts):
    """The text side as it was: every prompt at the full context length, in the caller's graph."""
    import torch.nn.functional as F

    text = F.normalize(model.encode_text(prompts.tokens), dim=-1)
    return F.normalize(text.reshape(prompts.n_classes, prompts.n_templates, -1).mean(1), dim=-1)


def _measure_text(cfg: dict) -> dict:
    from saft.models.text import encode_text
    from saft.sparse.objective import ClassPrompts, _class_chunks

    torch, device, loaded, names, templates = _setup(cfg)
    prompts = ClassPrompts.build(loaded.tokenizer, _spread(names, cfg["text_sample_classes"]), templates).to(device)
    chunks = _class_chunks(prompts, 1024)  # the head builder's chunks (HEAD_TEXT_BATCH prompts)
    t = prompts.n_templates
    lengths = []

    def run(cut: bool):
        with torch.inference_mode():
            for start, stop in chunks:
                tokens = prompts.tokens[start * t:stop * t]
                if cut:
                    from saft.models.text import exact_length

                    lengths.append(exact_length(loaded.model, tokens))
                    encode_text(loaded.model, tokens)
                else:
                    loaded.model.encode_text(tokens)

    run(False)  # warm-up
    full_s, full_peak, _ = _timed(device, lambda: run(False))
    cut_s, cut_peak, _ = _timed(device, lambda: run(True))
    scale = cfg["classes"] / cfg["text_sample_classes"]
    return {"prompts": prompts.n_prompts, "context_length": int(prompts.tokens.shape[1]),
            "cut_lengths": lengths, "seconds_full": full_s, "seconds_cut": cut_s, "speedup": full_s / cut_s,
            "extrapolated_prompts": int(prompts.n_prompts * scale),
            "extrapolated_seconds_full": full_s * scale, "extrapolated_seconds_cut": cut_s * scale,
            "peak_bytes_full": full_peak, "peak_bytes_cut": cut_peak}


def _measure_score_ours(cfg: dict) -> dict:
    import saft.sparse.scores as scores_module
    from saft.sparse.objective import ClassPrompts, auto_text_batch

    torch, device, loaded, names, _ = _setup(cfg)
    prompts = ClassPrompts.build(loaded.tokenizer, names[:cfg["classes"]], ["a photo of a {}."])
    data = _images(torch, cfg, cfg["classes"], cfg["score_batches"], device)
    phases = {"text_forward_s": 0.0, "text_forward_backward_s": 0.0}

    def timed_phase(name, fn):
        def wrapper(*args, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            phases[name] += time.perf_counter() - t0
            return out
        return wrapper

    originals = scores_module.encode_classes, scores_module.backward_classes
    scores_module.encode_classes = timed_phase("text_forward_s", originals[0])
    scores_module.backward_classes = timed_phase("text_forward_backward_s", originals[1])

    def run():
        return scores_module.importance_scores(loaded.model, data, prompts, progress=False,
                                               text_batch=auto_text_batch(cfg["text_batch"], cfg["batch_size"]))

    try:
        seconds, peak, _ = _timed(device, run)
    finally:
        scores_module.encode_classes, scores_module.backward_classes = originals
    image = seconds - phases["text_forward_s"] - phases["text_forward_backward_s"]
    return {"classes": cfg["classes"], "templates": 1, "batches": cfg["score_batches"], "seconds": seconds,
            "image_side_s": image, **phases, "peak_bytes": peak,
            "ratio_vs_image_plus_text_fb": seconds / (image + phases["text_forward_backward_s"])}


def _measure_score_old(cfg: dict, n_classes: int) -> dict:
    import torch.nn.functional as F

    from saft.sparse.objective import ClassPrompts, clip_logits
    from saft.sparse.scores import Eligibility

    torch, device, loaded, names, templates = _setup(cfg)
    model = loaded.model.eval()
    prompts = ClassPrompts.build(loaded.tokenizer, _spread(names, n_classes), templates).to(device)
    data = _images(torch, cfg, n_classes, cfg["old_score_batches"], device)
    params = Eligibility().select(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in params)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}

    def run():
        for images, labels in data:  # the old loop: both towers in one graph, every batch
            for p in params.values():
                p.grad = None
            loss = F.cross_entropy(clip_logits(model, images, _old_class_embeddings(model, prompts)).float(), labels)
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n].add_(p.grad, alpha=labels.numel())

    seconds, peak, _ = _timed(device, run)
    return {"classes": n_classes, "templates": prompts.n_templates, "batches": len(data),
            "seconds_per_batch": seconds / len(data), "peak_bytes": peak}


def _train_setup(cfg: dict, n_classes: int, templates: list[str]):
    from saft.sparse.mask import random_mask
    from saft.sparse.objective import ClassPrompts
    from saft.sparse.scores import Eligibility
    from saft.sparse.update import SparseUpdate

    torch, device, loaded, names, _ = _setup(cfg)
    model = loaded.model
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    shapes = {n: tuple(p.shape) for n, p in Eligibility().select(model).items()}
    mask = random_mask(shapes, cfg["density"], seed=cfg["seed"])
    update = SparseUpdate(mask, device=device)
    optimizer = torch.optim.AdamW(list(update.values), lr=1e-4)
    chosen = names[:n_classes] if n_classes >= len(names) // 2 else _spread(names, n_classes)
    prompts = ClassPrompts.build(loaded.tokenizer, chosen, templates).to(device)
    (images, labels), = _images(torch, cfg, n_classes, 1, device)
    return torch, device, model, update, optimizer, prompts, images, labels


def _measure_train_ours(cfg: dict, n_classes: int) -> dict:
    import torch.nn.functional as F

    from saft.sparse.objective import auto_text_batch, clip_logits, is_text_side
    from saft.sparse.text_side import StepTextSide

    torch, device, model, update, optimizer, prompts, images, labels = _train_setup(cfg, n_classes,
                                                                                   ["a photo of a {}."])
    side = StepTextSide(model, prompts, trains=any(is_text_side(n) for n in update.names),
                        text_batch=auto_text_batch(cfg["text_batch"], cfg["batch_size"]),
                        context=lambda: update.attached(model))
    times = {}

    def step():
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        text = side.begin()
        t1 = time.perf_counter()
        with update.attached(model):
            loss = F.cross_entropy(clip_logits(model, images, text).float(), labels)
        loss.backward()
        t2 = time.perf_counter()
        side.finish()
        optimizer.step()
        t3 = time.perf_counter()
        times.update(text_forward_s=t1 - t0, image_side_s=t2 - t1, text_backward_s=t3 - t2)

    for _ in range(cfg["warmup"]):
        step()
    seconds, peak, _ = _timed(device, step)
    return {"classes": n_classes, "templates": 1, "seconds": seconds, **times, "peak_bytes": peak,
            "text_trains": side.trains}


def _measure_train_old(cfg: dict, n_classes: int) -> dict:
    import open_clip
    import torch.nn.functional as F

    from saft.sparse.objective import clip_logits

    templates = [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    torch, device, model, update, optimizer, prompts, images, labels = _train_setup(cfg, n_classes, templates)

    def step():  # the old step: the text side re-encoded at 77 tokens in the step's graph
        optimizer.zero_grad(set_to_none=True)
        with update.attached(model):
            loss = F.cross_entropy(clip_logits(model, images, _old_class_embeddings(model, prompts)).float(), labels)
        loss.backward()
        optimizer.step()

    for _ in range(cfg["warmup"]):
        step()
    seconds, peak, _ = _timed(device, step)
    return {"classes": n_classes, "templates": prompts.n_templates, "seconds": seconds, "peak_bytes": peak}


_MEASURES = {"text": _measure_text, "score_ours": _measure_score_ours, "score_old": _measure_score_old,
             "train_ours": _measure_train_ours, "train_old": _measure_train_old}


def _measure(kind: str, cfg: dict, *args) -> dict:
    return _MEASURES[kind](cfg, *args)


# --- the run ----------------------------------------------------------------------------------


def _extrapolate(points: list[dict], key: str, x: int) -> float:
    """Linear in the class count through the two largest measured points."""
    a, b = sorted(points, key=lambda p: p["classes"])[-2:]
    slope = (b[key] - a[key]) / (b["classes"] - a["classes"])
    return b[key] + slope * (x - b["classes"])


def run_scale_benchmark(cfg: ScaleBenchConfig, progress: Callable[[str], None] = print) -> dict:
    import torch

    if len(set(cfg.old_class_counts)) < 2:
        raise ValueError("old_class_counts needs two different class counts to extrapolate from")
    c = asdict(cfg)
    # spawn, not fork: each measurement starts with a fresh process whose peak is its own
    ctx = multiprocessing.get_context("spawn")

    def measure(kind: str, *args) -> dict:
        progress(f"measuring {kind}{' ' + ', '.join(map(str, args)) if args else ''} ...")
        if not cfg.isolate:
            return _measure(kind, c, *args)
        with ctx.Pool(1) as pool:
            return pool.apply(_measure, (kind, c, *args))

    text = measure("text")
    score_ours = measure("score_ours")
    score_old = [measure("score_old", n) for n in cfg.old_class_counts]
    train_small = measure("train_ours", cfg.small_classes)
    train_large = measure("train_ours", cfg.classes)
    train_old = [measure("train_old", n) for n in cfg.old_class_counts]

    old_score_at = {"seconds_per_batch": _extrapolate(score_old, "seconds_per_batch", cfg.classes),
                    "peak_bytes": _extrapolate(score_old, "peak_bytes", cfg.classes)}
    old_score_at["seconds"] = old_score_at["seconds_per_batch"] * cfg.score_batches
    old_train_at = {"seconds": _extrapolate(train_old, "seconds", cfg.classes),
                    "peak_bytes": _extrapolate(train_old, "peak_bytes", cfg.classes)}
    values = {"train_peak_ratio": train_large["peak_bytes"] / train_small["peak_bytes"],
              "scoring_ratio": score_ours["ratio_vs_image_plus_text_fb"],
              "text_speedup": text["speedup"]}
    targets = {k: {"value": v, "target": TARGETS[k],
                   "met": v >= TARGETS[k] if k == "text_speedup" else v <= TARGETS[k]} for k, v in values.items()}
    device = torch.device(cfg.device)
    return {
        "config": c,
        "environment": {"torch": torch.__version__, "threads": cfg.threads or torch.get_num_threads(),
                        "machine": platform.machine(),
                        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
        "text": text,
        "scoring": {"ours": score_ours, "old_measured": score_old,
                    "old_extrapolated": {"classes": cfg.classes, "templates": 80, **old_score_at}},
        "training": {"ours": [train_small, train_large], "old_measured": train_old,
                     "old_extrapolated": {"classes": cfg.classes, "templates": 80, **old_train_at}},
        "targets": targets,
    }


def format_scale_benchmark(report: dict) -> str:
    cfg, text, s, t = report["config"], report["text"], report["scoring"], report["training"]

    def gb(v: float) -> str:
        return f"{v / 2**30:.2f} GB"

    lines = [f"{cfg['arch']} random init, {cfg['image_size']} px, batch {cfg['batch_size']}, "
             f"device {report['environment']['device']}, {report['environment']['threads']} threads",
             "",
             f"(c) text encoding, {text['prompts']} of ImageNet's prompts ({cfg['text_sample_classes']} classes x 80 "
             f"templates): {text['context_length']} tokens {text['seconds_full']:.1f} s, cut to "
             f"{min(text['cut_lengths'])}-{max(text['cut_lengths'])} tokens {text['seconds_cut']:.1f} s: "
             f"{text['speedup']:.2f}x faster; all {text['extrapolated_prompts']:,} prompts (extrapolated): "
             f"{text['extrapolated_seconds_full']:.0f} s vs {text['extrapolated_seconds_cut']:.0f} s",
             "",
             f"(a) scoring pass, {s['ours']['batches']} batches, {cfg['classes']} classes:",
             f"  ours   (1 template, cut, text once): {s['ours']['seconds']:.1f} s = image side "
             f"{s['ours']['image_side_s']:.1f} s + text forward {s['ours']['text_forward_s']:.1f} s + text forward/"
             f"backward {s['ours']['text_forward_backward_s']:.1f} s; peak {gb(s['ours']['peak_bytes'])}; "
             f"pass / (image side + text fwd/bwd) = {s['ours']['ratio_vs_image_plus_text_fb']:.2f}"]
    for p in s["old_measured"]:
        lines.append(f"  before (80 templates, 77 tokens, per batch), measured at {p['classes']} class(es): "
                     f"{p['seconds_per_batch']:.1f} s/batch, peak {gb(p['peak_bytes'])}")
    e = s["old_extrapolated"]
    lines.append(f"  before at {e['classes']} classes (extrapolated): {e['seconds']:.0f} s for the pass, "
                 f"peak {gb(e['peak_bytes'])}")
    lines.append("")
    lines.append("(b) training step (SAFT values at a random 0.1% mask over both towers):")
    for p in t["ours"]:
        lines.append(f"  ours   {p['classes']:>5} classes: {p['seconds']:.1f} s (text fwd {p['text_forward_s']:.1f} s, "
                     f"image {p['image_side_s']:.1f} s, text bwd {p['text_backward_s']:.1f} s), peak {gb(p['peak_bytes'])}")
    for p in t["old_measured"]:
        lines.append(f"  before {p['classes']:>5} class(es) x 80 templates: {p['seconds']:.1f} s, peak {gb(p['peak_bytes'])}")
    e = t["old_extrapolated"]
    lines.append(f"  before {e['classes']:>5} classes x 80 templates (extrapolated): {e['seconds']:.0f} s, "
                 f"peak {gb(e['peak_bytes'])}")
    lines.append("")
    for name, v in report["targets"].items():
        sign = ">=" if name == "text_speedup" else "<="
        lines.append(f"  [{'PASS' if v['met'] else 'MISS'}] {name} = {v['value']:.2f} (target {sign} {v['target']})")
    return "\n".join(lines)
