"""The few-shot grid: accuracy against the number of shots per class, on the embedded world.

For every ``shots`` in the grid (default 1, 2, 4, 8, 16, the CoOp protocol's counts) and
every seed: draw that many training images per class from the world's ID pool
(smaller draws are subsets of larger ones, see :mod:`saft.data.fewshot`), score the mask
(SAFT; a random mask for ``random``), fine-tune every method at its fixed learning rate
(default: the rates ``saft benchmark synthshift`` chose at 16 shots, ``params.yaml``'s
defaults), and evaluate the ``synthshift`` suite. Zero-shot does not depend on the shots
and is evaluated once.

Outputs in ``out_dir``: ``fewshot.json`` (per method and shots: ID and OOD mean top-1,
mean and sample std over seeds, None with one seed), ``fewshot.md`` (the table) and
``fewshot.png`` (ID and OOD mean against shots, the figure of the SAFT paper's few-shot
experiments; zero-shot as a dashed line). Every step records its inputs, so an
interrupted grid continues where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from saft.eval.metrics import ZERO_SHOT
from saft.eval.plots import colour
from saft.eval.report import fmt
from saft.eval.suites import load_suite
from saft.io import atomic_path, write_json
from saft.layout import FEWSHOT, FINETUNE, WORLD_SUITE
from saft.sparse.config import MASK_METHODS, METHODS, default_lr
from saft.steps.configs import DeltaRun, EvaluateConfig, FinetuneStepConfig, ScoreConfig
from saft.steps.evaluate import evaluate_suite
from saft.steps.finetune import finetune_step
from saft.steps.score import MASK_FILE, score_step
from saft.world.task import ID_DOMAIN, build_world

DEFAULT_SHOTS = (1, 2, 4, 8, 16)


@dataclass
class FewShotConfig:
    out_dir: Path = Path("runs/fewshot")
    world_dir: Path | None = None  # default: out_dir/world
    model: str = "tiny"
    shots: tuple[int, ...] = DEFAULT_SHOTS
    seeds: tuple[int, ...] = (1, 2, 3)
    methods: tuple[str, ...] = ("saft", "full")
    lrs: dict = field(default_factory=dict)  # method -> rate; a method not named: the model's recipe
    steps: int = 100
    batch_size: int = 32
    density: float = 0.001
    pool_per_class: int = 64
    test_per_class: int = 100

    def __post_init__(self) -> None:
        self.shots, self.seeds, self.methods = tuple(self.shots), tuple(self.seeds), tuple(self.methods)
        if not self.shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.shots):
            raise ValueError(f"shots must be positive integers, got {list(self.shots)}")
        if max(self.shots) > self.pool_per_class:
            raise ValueError(f"{max(self.shots)} shots need at least that many pool images per class "
                             f"(pool_per_class is {self.pool_per_class})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be among {', '.join(METHODS)}, got {list(self.methods)}")
        self.lrs = {m: float(self.lrs.get(m, default_lr(m, self.model))) for m in self.methods}
        if self.steps < 1 or not 0.0 < self.density <= 1.0:
            raise ValueError("steps must be >= 1 and density in (0, 1]")


def _train(cfg: FewShotConfig, seed_dir: Path, shots: int, seed: int, log) -> list[DeltaRun]:
    from saft.data.prepare import prepare_dataset

    world = Path(cfg.world_dir or cfg.out_dir / "world")
    data = seed_dir / "data"
    prepare_dataset(world / ID_DOMAIN / "pool", data, shots=shots, seed=seed, val_shots=0)  # rates are fixed: no lr choice
    runs = []
    for method in cfg.methods:
        mask = None
        if method in MASK_METHODS:
            kind = method
            score_step(ScoreConfig(model=cfg.model, density=cfg.density, kind=kind, seed=seed), data,
                       seed_dir / f"mask-{kind}", progress=False, log=None)
            mask = seed_dir / f"mask-{kind}" / MASK_FILE
        fcfg = FinetuneStepConfig(model=cfg.model, method=method, steps=cfg.steps, batch_size=cfg.batch_size,
                                  lr=cfg.lrs[method], warmup_steps=cfg.steps // 10, seed=seed)
        summary = finetune_step(fcfg, data, seed_dir / method, mask_path=mask, progress=False, log=None)
        log(f"{shots:>2} shots seed {seed} {method:<6} lr {cfg.lrs[method]:g}: final loss {summary['final_loss']:.3f}")
        runs.append(DeltaRun(method, str(seed_dir / method / FINETUNE.delta), seed))
    return runs


def run_fewshot(cfg: FewShotConfig, log: Callable[[str], None] = print, progress: bool = False) -> dict:
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    world = build_world(cfg.world_dir or out / "world", pool_per_class=cfg.pool_per_class,
                        test_per_class=cfg.test_per_class, log=log)
    suite = load_suite(str(world / WORLD_SUITE), str(world))
    curves: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    zeroshot = None
    for shots in cfg.shots:
        runs = []
        for seed in cfg.seeds:
            runs += _train(cfg, out / f"shots{shots}" / f"seed{seed}", shots, seed, log)
        # every entry named: metrics only; the grid's own table and plot are the report
        ecfg = EvaluateConfig(model=cfg.model, deltas=runs, zeroshot=zeroshot is None,
                              only=[e.name for e in suite.entries])
        doc = evaluate_suite(ecfg, suite, out / f"shots{shots}" / "eval", progress=progress, log=lambda *_: None)
        for agg in doc["aggregates"]:
            if agg["model"] == ZERO_SHOT:
                zeroshot = {"id": agg["id"], "ood_mean": agg["ood_mean"]}
            elif agg["alpha"] in (None, 1.0):
                curves[agg["model"]].append({"shots": shots, "id": agg["id"], "ood_mean": agg["ood_mean"],
                                             "seeds": agg["seeds"]})
        log(f"{shots:>2} shots: " + ", ".join(f"{m} ID {fmt(c[-1]['id'])} OOD {fmt(c[-1]['ood_mean'])}"
                                               for m, c in curves.items()))
    summary = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
               "suite": suite.name, "zeroshot": zeroshot, "methods": curves,
               "definitions": {"id": "mean top-1 over the ID datasets, then mean and sample std over seeds "
                                     "(std none with one seed)",
                               "ood_mean": "mean top-1 over the OOD datasets, then mean and sample std over seeds"},
               "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / FEWSHOT.results, summary)
    with atomic_path(out / FEWSHOT.table) as tmp:
        tmp.write_text(format_fewshot(summary) + "\n")
    with atomic_path(out / FEWSHOT.plot) as tmp:
        tmp.write_bytes(fewshot_png(summary))
    return summary


def format_fewshot(summary: dict) -> str:
    shots = [p["shots"] for p in next(iter(summary["methods"].values()))]
    head = ["method", "metric"] + [f"{k} shots" for k in shots]
    rows = []
    for key, label in (("id", "ID"), ("ood_mean", "OOD mean")):
        if summary.get("zeroshot"):
            rows.append(["zeroshot", label] + [fmt(summary["zeroshot"][key])] * len(shots))
        rows += [[m, label] + [fmt(p[key]) for p in points] for m, points in summary["methods"].items()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("\nTop-1 in %: mean ± sample std over seeds; a value without ± comes from one seed.")
    return "\n".join(lines)


def fewshot_png(summary: dict) -> bytes:
    """ID and OOD mean top-1 against shots (log2 axis), one line per method, zero-shot dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saft.eval.plots import png_bytes

    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.8), sharex=True)
    others: list[str] = []
    for ax, (key, label) in zip(axes, (("id", "ID top-1 (%)"), ("ood_mean", "OOD mean top-1 (%)"))):
        for method, points in summary["methods"].items():
            xs = [p["shots"] for p in points]
            ys = [100 * p[key]["mean"] for p in points]
            col = colour(method, others)
            ax.plot(xs, ys, "-o", color=col, markersize=4, label=method)
            spread = [(x, y, 100 * p[key]["std"]) for x, y, p in zip(xs, ys, points) if p[key]["std"] is not None]
            if spread:
                ax.errorbar([s[0] for s in spread], [s[1] for s in spread], yerr=[s[2] for s in spread], fmt="none",
                            ecolor=col, capsize=3)
        if summary.get("zeroshot"):
            ax.axhline(100 * summary["zeroshot"][key]["mean"], color=colour(ZERO_SHOT, others), linestyle="--",
                       label="zero-shot")
        ax.set_xscale("log", base=2)
        shots = sorted({p["shots"] for pts in summary["methods"].values() for p in pts})
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_xlabel("training shots per class")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("In-distribution")
    axes[1].set_title("Out-of-distribution")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    return png_bytes(fig)


__all__ = ["DEFAULT_SHOTS", "FewShotConfig", "fewshot_png", "format_fewshot", "run_fewshot"]
