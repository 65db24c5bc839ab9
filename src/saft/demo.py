"""``saft demo``: the whole core on one machine in a few minutes, with nothing downloaded.

It draws a small labelled image set, builds few-shot manifests from it, scores a SAFT
mask on a small open_clip ViT, fine-tunes it three ways (``saft``, ``random`` mask,
``full``), and reports accuracy, delta sizes, where the mask fell, and training curves.

The model here is randomly initialised: this exercises and measures the machinery
(exact top-k, sparse training, deltas that merge and unmerge exactly), not SAFT's
out-of-distribution claim, which needs a pre-trained model.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from saft.data import ManifestDataset, hash_entries, scan_image_folder, select_few_shot, write_manifest
from saft.eval import top1_accuracy
from saft.io import atomic_path, write_json
from saft.models import fingerprint_model as saft_fingerprint
from saft.models import load_model
from saft.sparse import (
    ClassPrompts,
    FinetuneConfig,
    apply_delta,
    finetune,
    importance_scores,
    random_mask,
    remove_delta,
    save_delta,
    select_mask,
)
from saft.sparse.scores import Eligibility

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")


@dataclass
class DemoConfig:
    out_dir: Path = Path("runs/demo")
    model: str = "saft-tiny-vit@random"
    images_per_class: int = 48
    shots: int = 16
    val_shots: int = 16
    density: float = 0.001
    steps: int = 60
    batch_size: int = 32
    lr: dict = field(default_factory=lambda: {"saft": 3e-3, "random": 3e-3, "full": 3e-4})
    seeds: tuple[int, ...] = (1, 2, 3)
    model_seed: int = 0


def draw_shape(shape: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One shape, random colour, position and scale, on a noisy background."""
    bg = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    px = img.load()
    for _ in range(size * 4):
        x, y = rng.randrange(size), rng.randrange(size)
        px[x, y] = tuple(min(255, c + rng.randint(0, 60)) for c in bg)
    d = ImageDraw.Draw(img)
    colour = tuple(rng.randint(120, 255) for _ in range(3))
    r = rng.randint(7, 12)
    cx, cy = rng.randint(r + 1, size - r - 2), rng.randint(r + 1, size - r - 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = max(2, r // 3)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
    elif shape == "ring":
        d.ellipse(box, outline=colour, width=max(2, r // 3))
    else:  # bar
        angle = rng.uniform(0, math.pi)
        dx, dy = r * math.cos(angle), r * math.sin(angle)
        d.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=3)
    return img


def write_shape_tree(root: Path, per_class: int, seed: int) -> Path:
    rng = random.Random(seed)
    for shape in SHAPES:
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"{i:04d}.png"
            if not path.exists():
                with atomic_path(path) as tmp:
                    draw_shape(shape, rng).save(tmp, format="PNG")
            else:
                draw_shape(shape, rng)  # keep the generator in step
    return root


def _plot(out_dir: Path, histories: dict[str, list[dict]], mask_stats: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method, hist in histories.items():
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training curves")
    ax.legend()
    fig.tight_layout()
    curves = out_dir / "curves.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    blocks = [(b, v["selected"]) for b, v in mask_stats["per_block"].items() if v["selected"]]
    blocks.sort(key=lambda x: -x[1])
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(blocks) + 1.2))
    ax.barh([b for b, _ in blocks][::-1], [n for _, n in blocks][::-1])
    ax.set_xlabel("selected entries")
    ax.set_title(f"Where the SAFT mask fell ({mask_stats['num_selected']} entries)")
    fig.tight_layout()
    where = out_dir / "mask_blocks.png"
    fig.savefig(where, dpi=120)
    plt.close(fig)
    return [curves, where]


def _run_seed(cfg: DemoConfig, seed: int, root: Path, index, out: Path, log) -> tuple[list[dict], dict, dict]:
    split = select_few_shot(index.entries, cfg.shots, seed, val_shots=cfg.val_shots, classes=index.classes)
    train_hash = write_manifest(out / "manifests" / "train.jsonl", hash_entries(root, split.train))
    write_manifest(out / "manifests" / "val.jsonl", hash_entries(root, split.val))

    loaded = load_model(cfg.model, seed=cfg.model_seed)
    model = loaded.model
    train = ManifestDataset(out / "manifests" / "train.jsonl", root, loaded.preprocess)
    val = ManifestDataset(out / "manifests" / "val.jsonl", root, loaded.preprocess)
    prompts = ClassPrompts.build(loaded.tokenizer, list(index.classes), TEMPLATES)

    loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size)
    scores = importance_scores(model, loader, prompts)
    meta = {"base_model": cfg.model, "base_fingerprint": loaded.fingerprint, "manifest_hash": train_hash}
    mask = select_mask(scores, cfg.density, meta=meta)
    mask.save(out / "mask.safetensors")
    stats = mask.stats()
    write_json(out / "mask_stats.json", stats)

    shapes = {n: tuple(p.shape) for n, p in Eligibility().select(model).items()}
    masks = {"saft": mask, "random": random_mask(shapes, cfg.density, seed=seed, meta=meta), "full": None}
    records = [{"method": "base", "seed": seed, "train_acc": top1_accuracy(model, train, prompts),
                "val_acc": top1_accuracy(model, val, prompts), "trained_values": 0, "delta_bytes": 0,
                "seconds": 0.0}]
    histories = {}
    for method in ("saft", "random", "full"):
        fcfg = FinetuneConfig(method=method, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr[method],
                              warmup_steps=max(1, cfg.steps // 10), seed=seed)
        result = finetune(model, train, prompts, mask=masks[method], config=fcfg, meta=meta)
        delta_path = save_delta(result.delta, out / method / "delta.safetensors")
        write_json(out / method / "history.json", result.history)
        histories[method] = result.history
        apply_delta(model, result.delta)
        records.append({"method": method, "seed": seed, "train_acc": top1_accuracy(model, train, prompts),
                        "val_acc": top1_accuracy(model, val, prompts), "trained_values": result.delta.num_values,
                        "delta_bytes": delta_path.stat().st_size, "seconds": round(result.seconds, 1)})
        remove_delta(model, result.delta)
    if saft_fingerprint(model) != loaded.fingerprint:
        raise RuntimeError("the base model changed during the demo: merge/unmerge is broken")
    row = {r["method"]: f"{r['val_acc']:.3f}" for r in records}
    log(f"      seed {seed}: mask {stats['num_selected']} entries in {stats['tensors_with_selection']} tensors; "
        f"val acc " + ", ".join(f"{m} {a}" for m, a in row.items()))
    return records, histories, stats


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def run_demo(cfg: DemoConfig, log=print) -> dict:
    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    log(f"[1/3] drawing {len(SHAPES)} classes x {cfg.images_per_class} images into {out / 'data'}")
    root = write_shape_tree(out / "data" / "shapes", cfg.images_per_class, cfg.model_seed)
    index = scan_image_folder(root)
    log(f"[2/3] model {cfg.model}; per seed: {cfg.shots}-shot split, SAFT mask at density {cfg.density}, "
        f"fine-tune saft / random / full for {cfg.steps} steps")
    records, histories, stats = [], {}, {}
    for seed in cfg.seeds:
        rec, hist, st = _run_seed(cfg, seed, root, index, out / f"seed{seed}", log)
        records += rec
        histories.setdefault("first", (hist, st))

    log("[3/3] report")
    first_hist, first_stats = histories["first"]
    plots = _plot(out, first_hist, first_stats)
    methods = ["base", "saft", "random", "full"]
    table = []
    for m in methods:
        rows = [r for r in records if r["method"] == m]
        tr, va = _mean_std([r["train_acc"] for r in rows]), _mean_std([r["val_acc"] for r in rows])
        table.append({"method": m, "train_acc_mean": tr[0], "train_acc_std": tr[1], "val_acc_mean": va[0],
                      "val_acc_std": va[1], "trained_values": rows[0]["trained_values"],
                      "delta_bytes": rows[0]["delta_bytes"], "seconds": rows[0]["seconds"]})
    summary = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
               "records": records, "summary": table, "plots": [p.name for p in plots],
               "seconds": round(time.perf_counter() - t_start, 1)}
    write_json(out / "results.json", summary)
    log("")
    log(f"mean \u00b1 std over seeds {', '.join(map(str, cfg.seeds))} ({cfg.shots} shots per class, "
        f"{len(SHAPES)} classes, chance {1 / len(SHAPES):.3f})")
    log(f"{'method':<10}{'train acc':>16}{'val acc':>16}{'trained values':>16}{'delta size':>12}")
    for r in table:
        size = f"{r['delta_bytes'] / 1024:.1f} KB" if r["delta_bytes"] else "-"
        log(f"{r['method']:<10}{r['train_acc_mean']:>9.3f} \u00b1 {r['train_acc_std']:.3f}"
            f"{r['val_acc_mean']:>9.3f} \u00b1 {r['val_acc_std']:.3f}{r['trained_values']:>16,}{size:>12}")
    log("")
    log("The base model is randomly initialised: this run measures the machinery (exact top-k masks, "
        "sparse training, exact merge/unmerge), not robustness to distribution shift.")
    log(f"outputs in {out}: results.json, curves.png, mask_blocks.png, seed<N>/{{mask,*/delta}}.safetensors")
    log(f"total {summary['seconds']:.0f} s")
    return summary
