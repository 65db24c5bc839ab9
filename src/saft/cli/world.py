"""``saft pretrain``: the embedded world's tiny CLIP (the benchmarks are in :mod:`saft.cli.protocols`)."""

from __future__ import annotations

import argparse


def _pretrain(args: argparse.Namespace) -> int:
    from saft.world.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(per_domain_class=args.per_class, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed)
    result = pretrain(cfg, args.out)
    print(f"wrote {args.out} (fingerprint {result['fingerprint'][:12]}..., {result['seconds']:.0f} s)")
    return 0


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
