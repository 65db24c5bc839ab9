"""``saft demo`` (``make demo``): the product's claim, measured on the embedded world.

Zero-shot, full fine-tuning, SAFT (density 0.001) and a random mask of the same size, each
at the learning rate the full protocol (``saft benchmark synthshift``) chose on the ID
validation split, over three seeds; then the ``synthshift`` suite, a results table, the
validity checks of the world, and a report with plots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from saft.world.benchmark import CHOSEN_LR_FILE, WorldConfig, run_world
from saft.world.table import format_checks, format_results

FALLBACK_LR = {"full": 1e-4, "saft": 3e-3, "random": 3e-3}


def chosen_learning_rates() -> dict[str, float]:
    if CHOSEN_LR_FILE.is_file():
        return {k: float(v) for k, v in json.loads(CHOSEN_LR_FILE.read_text())["chosen_lr"].items()}
    return dict(FALLBACK_LR)


def run_demo(out_dir: str | Path = "runs/demo", *, seeds=(1, 2, 3), steps: int = 100, model: str = "tiny",
             test_per_class: int = 100, log=print) -> dict:
    t0 = time.perf_counter()
    lrs = chosen_learning_rates()
    cfg = WorldConfig(out_dir=Path(out_dir), model=model, seeds=tuple(seeds), steps=steps,
                      grids={m: [lr] for m, lr in lrs.items()}, test_per_class=test_per_class)
    log(f"synthshift demo: model {model}, seeds {', '.join(map(str, seeds))}, {cfg.shots} shots per class, "
        f"{steps} steps; learning rates {', '.join(f'{m} {lr:g}' for m, lr in lrs.items())}")
    summary = run_world(cfg, log=log)
    log("")
    log(format_results(summary))
    log("")
    log(format_checks(summary))
    log(f"\nreport: {Path(out_dir) / 'eval' / 'report.html'}   results: {Path(out_dir) / 'results.json'}")
    log(f"total {time.perf_counter() - t0:.0f} s")
    return summary
