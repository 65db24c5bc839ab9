"""``saft pretrain`` and ``saft benchmark synthshift``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from saft.world.benchmark import WorldConfig


def _pretrain(args: argparse.Namespace) -> int:
    from saft.world.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(per_domain_class=args.per_class, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed)
    result = pretrain(cfg, args.out)
    print(f"wrote {args.out} (fingerprint {result['fingerprint'][:12]}..., {result['seconds']:.0f} s)")
    return 0


def world_config(args: argparse.Namespace) -> "WorldConfig":
    """The benchmark's configuration from parsed arguments; ValueError on a bad option."""
    from saft.sparse import Eligibility
    from saft.world.benchmark import DEFAULT_GRIDS, WorldConfig, parse_grid

    grids = dict(DEFAULT_GRIDS)
    for text in args.lr or []:
        method, rates = parse_grid(text)
        grids[method] = rates
    return WorldConfig(out_dir=Path(args.out), world_dir=Path(args.world) if args.world else None, model=args.model,
                       seeds=tuple(args.seeds), steps=args.steps, alphas=tuple(args.alpha), grids=grids,
                       methods=tuple(args.methods), density=args.density,
                       include=tuple(args.include or Eligibility.include),
                       exclude=tuple(Eligibility.exclude) + tuple(args.exclude or ()),
                       score_rule=args.score_rule, selection=args.selection, b2n=args.b2n)


def _benchmark(args: argparse.Namespace) -> int:
    from saft.io import write_json
    from saft.world.benchmark import run_world
    from saft.world.table import format_checks, format_results

    summary = run_world(world_config(args))  # a bad option raises ValueError before anything runs
    write_json(Path(args.out) / "chosen_lr.json", {"chosen_lr": summary["chosen_lr"],
                                                   "per_seed": summary["chosen_lr_per_seed"]})
    print()
    print(format_results(summary))
    print()
    print(format_checks(summary))
    return 3 if summary["checks_passed"] is False else 0


def register(sub) -> None:
    pt = sub.add_parser("pretrain", help="pre-train the embedded tiny CLIP on the embedded world",
                        description="Contrastive pre-training on captions of the pre-training domains; writes "
                                    "a safetensors checkpoint loadable as saft-tiny-clip@FILE.")
    pt.add_argument("--out", required=True, help="checkpoint file to write (.safetensors)")
    pt.add_argument("--steps", type=int, default=2400, help="optimizer steps (default: 2400)")
    pt.add_argument("--per-class", type=int, default=1000, help="images per domain and shape (default: 1000)")
    pt.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    pt.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (default: 1.5e-3)")
    pt.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    pt.set_defaults(func=_pretrain)

    bm = sub.add_parser("benchmark", help="full protocols: learning-rate grids x seeds")
    bm_sub = bm.add_subparsers(dest="benchmark_command", required=True, metavar="PROTOCOL")
    syn = bm_sub.add_parser("synthshift", help="the embedded world: every method over its lr grid, 3 seeds",
                            description="Chooses each method's learning rate on the ID validation split, "
                                        "evaluates the synthshift suite with alpha-interpolation curves and "
                                        "checks the world's validity.")
    syn.add_argument("--out", default="runs/synthshift", help="output folder (default: runs/synthshift)")
    syn.add_argument("--model", default="tiny", help="model spec (default: tiny)")
    syn.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (default: 1 2 3)")
    syn.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default: 100)")
    syn.add_argument("--alpha", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0],
                     help="interpolation weights of the deltas (default: 0.25 0.5 0.75 1)")
    syn.add_argument("--world", metavar="DIR", help="world root to render into or reuse (default: OUT/world)")
    syn.add_argument("--methods", nargs="+", choices=("full", "saft", "random"), default=["full", "saft", "random"],
                     help="methods to train; zero-shot is always evaluated, and the validity checks need full "
                          "(default: full saft random)")
    syn.add_argument("--lr", action="append", metavar="METHOD=LR[,LR...]",
                     help="replace a method's learning-rate grid, e.g. --lr saft=1e-3,3e-3 (repeatable; defaults: "
                          "full 1e-5,3e-5,1e-4,3e-4; saft and random 3e-4,1e-3,3e-3,1e-2)")
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
    syn.set_defaults(func=_benchmark)
