"""Evaluation throughput and memory: saft's streaming evaluation vs a plain open_clip loop.

A generated ImageFolder set (``saft.data.synth``, N images over its ten classes) is
scored twice in the same run: by the path ``saft evaluate`` takes (``EntryImages`` +
``evaluate_head``, a DataLoader over an index of paths) and by the loop an open_clip
user would write (PIL open -> preprocess -> ``encode_image`` -> logits against the
text features, batch by batch). Both keep only one batch of images in memory, so
their memory should stay flat as N grows; this benchmark shows that it does, and what
saft's extra machinery (storage layer, decoding checks, DataLoader) costs in images/s.

Each path runs in a fresh spawned process: peak RSS is per process (``ru_maxrss``
never goes down), and neither path inherits the other's page cache of Python objects.
Reported per path: images/s over the image loop (model loading and the text head are
not timed), the process's peak RSS, the RSS before the loop and the peak sampled during
it (its growth is what would scale with N if the evaluation did not stream), and top-1
(equal for both: same weights, preprocessing and head recipe).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

PATHS = ("open_clip", "saft")  # the baseline first


@dataclass
class EvalBenchConfig:
    images: int = 20_000
    model: str = "tiny"
    batch_size: int = 128
    domain: str = "photo"
    data: str | None = None  # generate into (and reuse) this folder; None: a temporary one, removed after
    device: str = "cpu"
    threads: int = 0  # torch threads in each measuring process; 0: torch's default
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 1 or self.batch_size < 1:
            raise ValueError(f"--images and --batch-size must be >= 1 (got {self.images}, {self.batch_size})")


def generate_set(root: str | Path, n: int, domain: str = "photo", seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> Path:
    """``root/<class>/<index>.png``: exactly ``n`` rendered images, classes round robin.

    Existing files are kept, so a second run over the same folder renders nothing.
    """
    from saft.data.synth import SHAPES, render
    from saft.io import atomic_path

    root = Path(root)
    for shape in SHAPES:
        (root / shape).mkdir(parents=True, exist_ok=True)
    per_class = math.ceil(n / len(SHAPES))
    written = 0
    for i in range(per_class):
        for shape in SHAPES:
            if written == n:
                return root
            written += 1
            path = root / shape / f"{i:06d}.png"
            if not path.exists():
                with atomic_path(path) as tmp:
                    render(domain, shape, i, seed).image.save(tmp, format="PNG")
            if progress and written % 5000 == 0:
                progress(f"generated {written:,} of {n:,} images")
    return root


def _current_rss() -> int | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class _RssSampler:
    """Peak RSS over a stretch of code, sampled every few milliseconds in a thread.

    ``ru_maxrss`` alone cannot tell the loop's peak from model loading's, which comes first.
    """

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, _current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _current_rss()
            if rss is not None and (self.peak is None or rss > self.peak):
                self.peak = rss

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        rss = _current_rss()
        if rss is not None and (self.peak is None or rss > self.peak):
            self.peak = rss


def _saft_loop(loaded, root: Path, cfg: EvalBenchConfig, classes: list[str], templates: list[str]):
    """What ``saft evaluate`` runs per suite dataset."""
    from saft.data.adapters import get_adapter
    from saft.eval.head import build_head
    from saft.eval.runner import evaluate_head
    from saft.steps.evaluate import EntryImages

    head = build_head(loaded.model, loaded.tokenizer, classes, templates, device=cfg.device)
    index = get_adapter("imagefolder").scan(str(root))

    def loop() -> tuple[int, int]:
        data = EntryImages(str(root), index.entries, loaded.preprocess)
        acc = evaluate_head(loaded.model, head, data, batch_size=cfg.batch_size, device=cfg.device)
        return acc.correct, acc.n

    return loop


def _open_clip_loop(loaded, root: Path, cfg: EvalBenchConfig, classes: list[str], templates: list[str]):
    """The baseline: the zero-shot loop from the open_clip README, batched, nothing else."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    model, preprocess, device = loaded.model, loaded.preprocess, torch.device(cfg.device)
    model.eval()
    files = [(root / c / name, label) for label, c in enumerate(classes)
             for name in sorted(os.listdir(root / c)) if name.endswith(".png")]
    with torch.inference_mode():
        tokens = loaded.tokenizer([t.format(c) for c in classes for t in templates]).to(device)
        text = F.normalize(model.encode_text(tokens).float(), dim=-1).reshape(len(classes), len(templates), -1)
        text = F.normalize(text.mean(1), dim=-1)

    def loop() -> tuple[int, int]:
        correct = 0
        with torch.inference_mode():
            for start in range(0, len(files), cfg.batch_size):
                batch = files[start:start + cfg.batch_size]
                images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p, _ in batch]).to(device)
                features = F.normalize(model.encode_image(images).float(), dim=-1)
                pred = (100.0 * features @ text.t()).argmax(-1).cpu()
                correct += int((pred == torch.tensor([label for _, label in batch])).sum())
        return correct, len(files)

    return loop


def _measure(path: str, root: str, cfg_dict: dict) -> dict:
    """Runs in a fresh process: load the model, time one path's image loop, report memory."""
    import torch

    from saft.data.adapters import get_adapter
    from saft.models import load_model

    cfg = EvalBenchConfig(**cfg_dict)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, device=cfg.device)
    adapter = get_adapter("imagefolder")
    classes, templates = adapter.class_names(root), list(adapter.templates)
    build = {"saft": _saft_loop, "open_clip": _open_clip_loop}[path]
    loop = build(loaded, Path(root), cfg, classes, templates)
    rss_before = _current_rss()
    with _RssSampler() as sampler:
        t0 = time.perf_counter()
        correct, n = loop()
        seconds = time.perf_counter() - t0
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "top1": correct / n,
            "peak_rss_bytes": _maxrss_bytes(), "rss_before_loop_bytes": rss_before,
            "peak_rss_in_loop_bytes": sampler.peak,
            "rss_growth_in_loop_bytes": (sampler.peak - rss_before) if sampler.peak and rss_before else None,
            "threads": torch.get_num_threads()}


def run_eval_benchmark(cfg: EvalBenchConfig, progress: Callable[[str], None] = print) -> dict:
    tmp = None
    if cfg.data:
        root = Path(cfg.data)
    else:
        tmp = tempfile.mkdtemp(prefix="saft-bench-eval-")
        root = Path(tmp) / "images"
    try:
        t0 = time.perf_counter()
        progress(f"generating {cfg.images:,} {cfg.domain} images in {root} ...")
        generate_set(root, cfg.images, cfg.domain, cfg.seed, progress)
        generate_s = time.perf_counter() - t0
        on_disk = sum(1 for _ in root.rglob("*.png"))
        if on_disk != cfg.images:
            raise ValueError(f"{root} holds {on_disk} images, not {cfg.images}: use an empty folder (or the "
                             "one an earlier run of the same --images filled)")
        # spawn, not fork: a forked child would start with this process's memory as its RSS.
        ctx = multiprocessing.get_context("spawn")
        results = {}
        for path in PATHS:
            progress(f"{path}: evaluating {cfg.images:,} images in a fresh process ...")
            pool = ctx.Pool(1)
            try:
                results[path] = pool.apply(_measure, (path, str(root), asdict(cfg)))
                pool.close()  # a clean shutdown; terminate() (the with-block's exit) leaks a semaphore
            finally:
                pool.terminate()
                pool.join()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    base, ours = results["open_clip"], results["saft"]

    def ratio(key: str) -> float | None:
        return ours[key] / base[key] if ours.get(key) and base.get(key) else None

    import torch

    return {
        "config": asdict(cfg),
        "environment": {"torch": torch.__version__, "machine": platform.machine(),
                        "processor": platform.processor(), "cpus": os.cpu_count(), "device": cfg.device},
        "generate_seconds": generate_s,
        "paths": results,
        "ratios_saft_vs_open_clip": {"images_per_s": ratio("images_per_s"), "peak_rss": ratio("peak_rss_bytes"),
                                     "peak_rss_in_loop": ratio("peak_rss_in_loop_bytes")},
    }


def format_eval_benchmark(report: dict) -> str:
    cfg = report["config"]
    mib = 2 ** 20

    def mb(value) -> str:
        return "n/a" if value is None else f"{value / mib:.1f}"

    lines = [f"{cfg['images']:,} {cfg['domain']} images, model {cfg['model']}, batch {cfg['batch_size']}, "
             f"device {cfg['device']}, {report['paths']['saft']['threads']} threads",
             f"{'path':<11}{'images/s':>10}{'top-1':>8}{'peak RSS MB':>13}{'before loop':>13}{'loop peak':>11}"
             f"{'growth':>9}"]
    for name, r in report["paths"].items():
        lines.append(f"{name:<11}{r['images_per_s']:>10.1f}{100 * r['top1']:>7.2f}%{mb(r['peak_rss_bytes']):>13}"
                     f"{mb(r['rss_before_loop_bytes']):>13}{mb(r['peak_rss_in_loop_bytes']):>11}"
                     f"{mb(r['rss_growth_in_loop_bytes']):>9}")
    q = report["ratios_saft_vs_open_clip"]

    def x(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines.append(f"saft / open_clip: images/s {x(q['images_per_s'])}, peak RSS {x(q['peak_rss'])}, "
                 f"loop peak RSS {x(q['peak_rss_in_loop'])}")
    return "\n".join(lines)
