"""``saft pretrain`` and ``saft benchmark synthshift``."""

from __future__ import annotations

import argparse
from pathlib import Path


def _pretrain(args: argparse.Namespace) -> int:
    from saft.world.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(per_domain_class=args.per_class, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed)
    result = pretrain(cfg, args.out)
    print(f"wrote {args.out} (fingerprint {result['fingerprint'][:12]}..., {result['seconds']:.0f} s)")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from saft.io import write_json
    from saft.world.benchmark import WorldConfig, run_world
    from saft.world.table import format_checks, format_results

    cfg = WorldConfig(out_dir=Path(args.out), model=args.model, seeds=tuple(args.seeds), steps=args.steps,
                      alphas=tuple(args.alpha))
    summary = run_world(cfg)
    write_json(Path(args.out) / "chosen_lr.json", {"chosen_lr": summary["chosen_lr"],
                                                   "per_seed": summary["chosen_lr_per_seed"]})
    print()
    print(format_results(summary))
    print()
    print(format_checks(summary))
    return 0 if summary["checks_passed"] else 3


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
    syn.set_defaults(func=_benchmark)
