"""``saft score`` and ``saft finetune``: the method's steps on a prepared data folder."""

from __future__ import annotations

import argparse



def _score(args: argparse.Namespace) -> int:
    from saft.steps.score import ScoreConfig, score_step

    cfg = ScoreConfig(model=args.model, density=args.density, rule=args.rule, kind=args.kind,
                      include=args.include, exclude=args.exclude, batch_size=args.batch_size,
                      num_workers=args.num_workers, seed=args.seed, device=args.device)
    stats = score_step(cfg, args.data, args.out, root=args.root)
    top = sorted(stats["per_tensor"].items(), key=lambda kv: -kv[1]["selected"])[:5]
    print(f"mask: {stats['num_selected']:,} of {stats['eligible']:,} entries "
          f"({stats['density']:.4%}) in {stats['tensors_with_selection']} of {stats['tensors_eligible']} tensors")
    print("most selected: " + ", ".join(f"{n} ({v['selected']:,})" for n, v in top))
    print(f"wrote {args.out}/mask.safetensors, mask_stats.json, score.json")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from saft.sparse import FinetuneConfig
    from saft.steps.finetune import finetune_step

    cfg = FinetuneConfig(method=args.method, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                         max_grad_norm=args.max_grad_norm or None, seed=args.seed, precision=args.precision,
                         checkpoint_every=args.checkpoint_every, num_workers=args.num_workers)
    summary = finetune_step(args.model, cfg, args.data, args.out, mask_path=args.mask, root=args.root,
                            resume=args.resume, device=args.device, skip_corrupt=args.skip_corrupt)
    print(f"{cfg.method}: {summary['trained_values']:,} trained values, final loss {summary['final_loss']:.4f}, "
          f"{summary['seconds']:.1f} s")
    print(f"wrote {args.out}/delta.safetensors, history.json, finetune.json")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from saft.eval.suites import load_suite
    from saft.steps.evaluate import DeltaRun, EvaluateConfig, evaluate_suite

    cfg = EvaluateConfig(model=args.model, deltas=[DeltaRun.parse(d) for d in args.delta], alphas=args.alpha,
                         zeroshot=not args.no_zeroshot, batch_size=args.batch_size, num_workers=args.num_workers,
                         device=args.device, template_set=args.templates)
    suite = load_suite(args.suite, args.data_root)
    doc = evaluate_suite(cfg, suite, args.out)
    print()
    for agg in doc["aggregates"]:
        parts = [f"{agg['model']}" + ("" if agg["alpha"] is None else f" @ alpha {agg['alpha']:g}")]
        for key, label in (("id", "ID"), ("ood_mean", "OOD mean"), ("base", "base"), ("new", "new"), ("hm", "HM")):
            if key in agg:
                parts.append(f"{label} {100 * agg[key]['mean']:.2f} ± {100 * agg[key]['std']:.2f}")
        print(" | ".join(parts))
    print(f"wrote {args.out}/metrics.json, report.md, report.html")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec: ARCH@TAG, ARCH@/path/weights or ARCH@random")
    p.add_argument("--data", required=True, help="prepared data folder (from `saft data prepare`)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--root", help="dataset root, overriding the one recorded in the data folder")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")


def register(sub) -> None:
    score = sub.add_parser("score", help="score parameter entries and write the SAFT mask",
                           description="Phase I of SAFT: gradients of the downstream loss at the pre-trained "
                                       "weights over the training manifest; keep the top entries.")
    _common(score)
    score.add_argument("--density", type=float, default=0.001, help="fraction of eligible entries (default: 0.001)")
    score.add_argument("--rule", default="abs_mean", choices=["abs_mean", "mean_abs", "mean_sq"],
                       help="score rule: |mean g| (default), mean |g| or mean g^2 over batches")
    score.add_argument("--kind", default="saft", choices=["saft", "random"],
                       help="saft: gradient scores (default); random: a random mask of the same density")
    score.add_argument("--include", nargs="+", default=["*"], metavar="PATTERN",
                       help="eligible parameter name patterns (fnmatch; default: *)")
    score.add_argument("--exclude", nargs="+", default=["logit_scale", "logit_bias"], metavar="PATTERN",
                       help="excluded parameter name patterns (default: logit_scale logit_bias)")
    score.set_defaults(func=_score)

    ft = sub.add_parser("finetune", help="fine-tune (saft, random or full) and write the delta",
                        description="Phase II of SAFT, or the baselines: trains the mask's entries (saft, random) "
                                    "or every eligible parameter (full) and writes base-relative deltas.")
    _common(ft)
    ft.add_argument("--method", default="saft", choices=["saft", "random", "full"], help="method (default: saft)")
    ft.add_argument("--mask", help="mask file from `saft score` (required for saft and random)")
    ft.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    ft.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    ft.add_argument("--lr", type=float, help="learning rate (default: 1e-4 for saft/random, 1e-5 for full)")
    ft.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    ft.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default: 0)")
    ft.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm; 0 disables (default: 1)")
    ft.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="auto: bf16 autocast on CUDA, fp32 on CPU (default: auto)")
    ft.add_argument("--checkpoint-every", type=int, default=0,
                    help="write a resumable checkpoint every N steps into OUT/checkpoints (default: 0, never)")
    ft.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints after an interruption")
    ft.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images instead of failing")
    ft.set_defaults(func=_finetune)

    ev = sub.add_parser("evaluate", help="top-1 on an evaluation suite for the base and base + alpha * delta",
                        description="Zero-shot heads from each dataset's class names and templates; writes "
                                    "metrics.json (one record per model x dataset x seed x alpha, plus "
                                    "aggregates) and a Markdown/HTML report with plots.")
    ev.add_argument("--model", required=True, help="base model spec: ARCH@TAG, ARCH@/path/weights or ARCH@random")
    ev.add_argument("--suite", required=True,
                    help="imagenet-shifts, base2new, cross-dataset, or the path of a suite YAML file")
    ev.add_argument("--data-root", help="folder (or s3:// prefix) holding the datasets in their default folders")
    ev.add_argument("--delta", action="append", default=[], metavar="NAME[:SEED]=PATH",
                    help="a delta to evaluate, repeatable (e.g. saft:1=runs/s1/saft/delta.safetensors)")
    ev.add_argument("--alpha", type=float, nargs="+", default=[1.0],
                    help="evaluate base + alpha * delta for each value (default: 1.0)")
    ev.add_argument("--no-zeroshot", action="store_true", help="skip the base model itself")
    ev.add_argument("--templates", default="default",
                    help="prompt set where a dataset offers several, e.g. simple for ImageNet (default: default)")
    ev.add_argument("--out", required=True, help="output folder (created if missing)")
    ev.add_argument("--batch-size", type=int, default=128, help="images per batch (default: 128)")
    ev.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    ev.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    ev.set_defaults(func=_evaluate)
