"""``saft benchmark synthshift`` and ``saft benchmark fewshot``: the protocols on the embedded world."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from saft.protocols.fewshot import FewShotConfig
    from saft.protocols.synthshift import WorldConfig


def world_config(args: argparse.Namespace) -> "WorldConfig":
    """The benchmark's configuration from parsed arguments; ValueError on a bad option."""
    from saft.sparse import Eligibility
    from saft.protocols.synthshift import DEFAULT_GRIDS, WorldConfig, parse_grid

    grids = dict(DEFAULT_GRIDS)
    for text in args.lr or []:
        method, rates = parse_grid(text)
        grids[method] = rates
    return WorldConfig(out_dir=Path(args.out), world_dir=Path(args.world) if args.world else None, model=args.model,
                       world=args.world_version, seeds=args.seeds and tuple(args.seeds), steps=args.steps,
                       alphas=args.alpha and tuple(args.alpha), grids=grids,
                       methods=tuple(args.methods), density=args.density,
                       include=tuple(args.include or Eligibility.include),
                       exclude=tuple(Eligibility.exclude) + tuple(args.exclude or ()),
                       score_rule=args.score_rule, selection=args.selection, b2n=args.b2n, resume=args.resume)


def _synthshift(args: argparse.Namespace) -> int:
    from saft.io import write_json
    from saft.layout import SYNTHSHIFT_BENCHMARK
    from saft.protocols.synthshift import run_world
    from saft.world.table import format_checks, format_results

    summary = run_world(world_config(args))  # a bad option raises ValueError before anything runs
    write_json(Path(args.out) / SYNTHSHIFT_BENCHMARK.chosen_lr, {"chosen_lr": summary["chosen_lr"],
                                                   "per_seed": summary["chosen_lr_per_seed"],
                                                   **({"wiseft_alpha": summary["wiseft_alpha"]}
                                                      if summary.get("wiseft_alpha") else {})})
    print()
    print(format_results(summary))
    if summary.get("wiseft_alpha"):
        print("wiseft alpha (chosen on ID validation): "
              + ", ".join(f"seed {s} {a:g}" for s, a in summary["wiseft_alpha"].items()))
    print()
    print(format_checks(summary))
    return 3 if summary["checks_passed"] is False else 0


def fewshot_config(args: argparse.Namespace) -> "FewShotConfig":
    """The few-shot grid's configuration from parsed arguments; ValueError on a bad option."""
    from saft.protocols.fewshot import FewShotConfig

    lrs = {}
    for text in args.lr or []:
        method, sep, value = text.partition("=")
        try:
            lrs[method.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--lr {text!r}: expected METHOD=LR, e.g. saft=3e-3") from None
        if not sep or not lrs[method.strip()] > 0:
            raise ValueError(f"--lr {text!r}: expected METHOD=LR with a positive rate, e.g. saft=3e-3")
    return FewShotConfig(out_dir=Path(args.out), world_dir=Path(args.world) if args.world else None,
                         model=args.model, shots=tuple(args.shots), seeds=tuple(args.seeds),
                         methods=tuple(args.methods), lrs=lrs, steps=args.steps, density=args.density,
                         pool_per_class=args.pool_per_class, test_per_class=args.test_per_class)


def _fewshot(args: argparse.Namespace) -> int:
    from saft.layout import FEWSHOT
    from saft.protocols.fewshot import format_fewshot, run_fewshot

    summary = run_fewshot(fewshot_config(args), progress=args.progress)
    print()
    print(format_fewshot(summary))
    print(f"\nwrote {Path(args.out) / FEWSHOT.results}, {Path(args.out) / FEWSHOT.plot}")
    return 0


def register(sub) -> None:
    from saft.protocols.methods import DEFAULT_GRIDS, DEFAULT_METHODS, METHODS
    from saft.sparse.config import METHODS as FEWSHOT_METHODS  # the trained ones, each at its fixed rate
    from saft.world.spec import DEFAULT_WORLD, WORLDS, get_world

    task = get_world().task

    bm = sub.add_parser("benchmark", help="full protocols: learning-rate grids x seeds")
    bm_sub = bm.add_subparsers(dest="benchmark_command", required=True, metavar="PROTOCOL")
    syn = bm_sub.add_parser("synthshift", help="the embedded world: every method over its lr grid, 3 seeds",
                            description="Chooses each method's learning rate on the ID validation split, "
                                        "evaluates the synthshift suite with alpha-interpolation curves and "
                                        "checks the world's validity.")
    syn.add_argument("--out", default="runs/synthshift", help="output folder (default: runs/synthshift)")
    syn.add_argument("--model", default="tiny", help="model spec (default: tiny)")
    syn.add_argument("--world-version", choices=list(WORLDS), default=DEFAULT_WORLD,
                     help=f"which embedded world; its task sets the defaults below (default: {DEFAULT_WORLD})")
    syn.add_argument("--seeds", type=int, nargs="+",
                     help=f"seeds (default: the world's, {' '.join(map(str, task.seeds))})")
    syn.add_argument("--steps", type=int, help=f"optimizer steps per run (default: the world's, {task.steps})")
    syn.add_argument("--alpha", type=float, nargs="+",
                     help="interpolation weights of the deltas (default: the world's, "
                          f"{' '.join(f'{a:g}' for a in task.alphas)}; validity check 5 needs 0.5)")
    syn.add_argument("--world", metavar="DIR", help="world root to render into or reuse (default: OUT/world)")
    syn.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                     help="methods to compare; zero-shot is always evaluated, the validity checks need full, wiseft "
                          "(full's delta at the alpha chosen on ID validation) needs full (default: "
                          f"{' '.join(DEFAULT_METHODS)}; lpft on request)")
    syn.add_argument("--lr", action="append", metavar="METHOD=LR[,LR...]",
                     help="replace a method's learning-rate grid, e.g. --lr saft=1e-3,3e-3 (repeatable; defaults: "
                          + "; ".join(f"{m} {','.join(f'{x:g}' for x in g)}" for m, g in DEFAULT_GRIDS.items()) + ")")
    syn.add_argument("--density", type=float, default=0.001,
                     help="fraction of the eligible entries SAFT and the random mask train (default: 0.001)")
    syn.add_argument("--include", nargs="+", metavar="PATTERN",
                     help="fnmatch patterns of parameter names SAFT and the random mask may select "
                          "(default: *); full fine-tuning is unaffected")
    syn.add_argument("--exclude", nargs="+", metavar="PATTERN",
                     help="patterns they may not select, besides logit_scale and logit_bias, "
                          "e.g. --exclude 'visual.conv1.*'")
    syn.add_argument("--score-rule", choices=("abs_mean", "mean_abs", "mean_sq"), default="abs_mean",
                     help="SAFT's score: |mean gradient| (the paper), or mean |g| / mean g^2 over batches "
                          "(default: abs_mean)")
    syn.add_argument("--selection", choices=("global", "layerwise"), default="global",
                     help="global top-k over all eligible entries (the paper), or per tensor: each keeps its "
                          "round(density * size) best entries (default: global)")
    syn.add_argument("--no-b2n", dest="b2n", action="store_false",
                     help="skip base-to-new (training on the base half of the classes at the chosen rates)")
    syn.add_argument("--resume", action="store_true",
                     help="reuse the deltas a killed run left in OUT when they were trained with the same "
                          "configuration, data and base (scores, validation and evaluation are recomputed)")
    syn.set_defaults(func=_synthshift)

    few = bm_sub.add_parser("fewshot", help="the few-shot grid: accuracy against shots per class, over seeds",
                            description="For every shot count and seed: draw the few-shot split from the world's "
                                        "ID pool, score the mask, fine-tune each method at a fixed learning rate "
                                        "and evaluate the synthshift suite; writes fewshot.json, fewshot.md and "
                                        "the accuracy-vs-shots plot fewshot.png.")
    few.add_argument("--out", default="runs/fewshot", help="output folder (default: runs/fewshot)")
    few.add_argument("--model", default="tiny", help="model spec (default: tiny)")
    few.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                     help="training images per class (default: 1 2 4 8 16)")
    few.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (default: 1 2 3)")
    few.add_argument("--methods", nargs="+", choices=FEWSHOT_METHODS, default=["saft", "full"],
                     help="methods to train; zero-shot is always evaluated (default: saft full)")
    few.add_argument("--lr", action="append", metavar="METHOD=LR",
                     help="a method's learning rate (repeatable; defaults: params.yaml's, chosen by the synthshift "
                          "protocol at 16 shots)")
    few.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default: 100)")
    few.add_argument("--density", type=float, default=0.001, help="mask density (default: 0.001)")
    few.add_argument("--world", metavar="DIR", help="world root to render into or reuse (default: OUT/world)")
    few.add_argument("--pool-per-class", type=int, default=64, help="ID pool images per class (default: 64)")
    few.add_argument("--test-per-class", type=int, default=100,
                     help="test images per class and domain (default: 100)")
    few.add_argument("--progress", action="store_true", help="progress bars for evaluation")
    few.set_defaults(func=_fewshot)
