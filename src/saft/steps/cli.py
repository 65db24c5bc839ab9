"""The step commands: ``saft world``, ``score``, ``finetune``, ``evaluate``, ``collect`` and ``run``."""

from __future__ import annotations

import argparse
import os

from saft.steps.params import resolve_device


def _main_rank() -> bool:
    """Under torchrun only rank 0 reports (every rank runs the same step)."""
    return int(os.environ.get("RANK", "0")) == 0



def _score(args: argparse.Namespace) -> int:
    from saft.steps.score import ScoreConfig, score_step

    cfg = ScoreConfig(model=args.model, density=args.density, rule=args.rule, kind=args.kind,
                      include=args.include, exclude=args.exclude, batch_size=args.batch_size, seed=args.seed,
                      device=resolve_device(args.device), prompts=args.prompts, text_batch=args.text_batch,
                      **_loader(args))
    stats = score_step(cfg, args.data, args.out, root=args.root)
    if not _main_rank():
        return 0
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
                         checkpoint_every=args.checkpoint_every, text_batch=args.text_batch, **_loader(args))
    summary = finetune_step(args.model, cfg, args.data, args.out, mask_path=args.mask, root=args.root,
                            resume=args.resume, device=resolve_device(args.device), skip_corrupt=args.skip_corrupt,
                            prompts=args.prompts, checkpoint_dir=args.checkpoint_dir)
    if not _main_rank():
        return 0
    print(f"{cfg.method}: {summary['trained_values']:,} trained values, final loss {summary['final_loss']:.4f}, "
          f"{summary['seconds']:.1f} s")
    print(f"wrote {args.out}/delta.safetensors, history.json, finetune.json")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from saft.eval.suites import load_suite
    from saft.steps.evaluate import DeltaRun, EvaluateConfig, evaluate_suite

    from saft.eval.report import fmt

    cfg = EvaluateConfig(model=args.model, deltas=[DeltaRun.parse(d) for d in args.delta], alphas=args.alpha,
                         zeroshot=not args.no_zeroshot, batch_size=args.batch_size, device=resolve_device(args.device),
                         template_set=args.templates, only=args.only, reference=args.reference, **_loader(args))
    suite = load_suite(args.suite, args.data_root)
    doc = evaluate_suite(cfg, suite, args.out)
    if not _main_rank():
        return 0
    print()
    for agg in doc["aggregates"]:
        parts = [f"{agg['model']}" + ("" if agg["alpha"] is None else f" @ alpha {agg['alpha']:g}")]
        for key, label in (("id", "ID"), ("ood_mean", "OOD mean"), ("effective_robustness", "eff. robustness"),
                           ("base", "base"), ("new", "new"), ("hm", "HM")):
            if key in agg:
                parts.append(f"{label} {fmt(agg[key])}")
        print(" | ".join(parts))
    print(f"wrote {args.out}/metrics.json, report.md, report.html")
    return 0


def _world(args: argparse.Namespace) -> int:
    from saft.steps.params import WorldParams
    from saft.steps.world import world_step

    summary = world_step(args.out, WorldParams(pool_per_class=args.pool_per_class, test_per_class=args.test_per_class))
    print(f"world in {summary['root']}: train pool {summary['train_root']}, suite {summary['suite']}")
    return 0


def _collect(args: argparse.Namespace) -> int:
    from saft.steps.collect import collect_step, results_text
    from saft.steps.evaluate import DeltaRun

    summary = collect_step(args.metrics, args.out, deltas=[DeltaRun.parse(d) for d in args.delta])
    print(results_text(summary))
    print(f"wrote {args.out}/metrics.json, results.json, results.md, report.html")
    return 3 if summary.get("checks_passed") is False else 0


def _run(args: argparse.Namespace) -> int:
    from saft.steps.params import load_cli_params
    from saft.steps.run import run_pipeline

    params, source = load_cli_params(args.params, args.set)
    print(f"parameters: {source}")
    summary = run_pipeline(params, args.out, tracking=not args.no_tracking, progress=args.progress)
    return 3 if summary.get("checks_passed") is False else 0


def _loader(args: argparse.Namespace) -> dict:
    return {"num_workers": args.num_workers, "pin_memory": args.pin_memory,
            "persistent_workers": args.persistent_workers}


def _loader_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-workers", type=int, default=-1,
                   help="DataLoader worker processes; -1 chooses from the task's CPUs (GPU: min(8, cpus-1), "
                        "CPU: min(4, cpus//2-1)) (default: -1)")
    p.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="pinned host memory for batches (CUDA only; default: on)")
    p.add_argument("--persistent-workers", action=argparse.BooleanOptionalAction, default=True,
                   help="keep loader workers alive between passes (default: on)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec: ARCH@TAG, ARCH@/path/weights or ARCH@random")
    p.add_argument("--data", required=True, help="prepared data folder (from `saft data prepare`)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--root", help="dataset root, overriding the one recorded in the data folder")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    _loader_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--device", default="auto", help="torch device: cpu, cuda, cuda:N or auto (cuda when visible; default)")
    p.add_argument("--prompts", default="train", choices=["train", "eval"],
                   help="prompt set of the loss: train (the data's training prompt, default) or eval (the "
                        "evaluation ensemble, e.g. CLIP's 80 ImageNet prompts)")
    p.add_argument("--text-batch", type=int, default=0,
                   help="prompts encoded at once; bounds the text side's memory at any class count "
                        "(default: 0 = 8 per image of the batch, within 32-2048)")


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
    ft.add_argument("--checkpoint-dir",
                    help="checkpoint folder instead of OUT/checkpoints (a pipeline task keys it by the run, so a "
                         "retry in a fresh pod finds it)")
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
    _loader_flags(ev)
    ev.add_argument("--device", default="auto", help="torch device: cpu, cuda, cuda:N or auto (cuda when visible; default)")
    ev.add_argument("--reference", default="",
                    help="effective-robustness reference fit: a shipped name (taori2020-testbed), 'none', or a "
                         "reference YAML file (default: the suite's own; imagenet-shifts uses taori2020-testbed)")
    ev.add_argument("--only", nargs="+", default=[], metavar="NAME",
                    help="evaluate only these suite datasets (a fan-out part; merge parts with `saft collect`)")
    ev.set_defaults(func=_evaluate)

    co = sub.add_parser("collect", help="merge evaluation parts into one metrics.json, report and results table",
                        description="Merges the metrics.json files of `saft evaluate --only` parts (records "
                                    "concatenated, aggregates recomputed), writes the report, results.json and "
                                    "results.md; on the synthshift suite also the world's validity checks "
                                    "(exit code 3 when one fails).")
    co.add_argument("metrics", nargs="+", help="metrics.json files (or folders holding one) to merge")
    co.add_argument("--delta", action="append", default=[], metavar="NAME[:SEED]=PATH",
                    help="the evaluated deltas, for the table's trainable-values and size columns (repeatable)")
    co.add_argument("--out", required=True, help="output folder (created if missing)")
    co.set_defaults(func=_collect)

    wo = sub.add_parser("world", help="render the embedded world (the default data) into a folder",
                        description="Deterministic: the same sizes give the same images; existing images are "
                                    "kept. Writes the ID pool (textile/pool), test sets per domain and the "
                                    "synthshift suite files.")
    wo.add_argument("--out", default="runs/world", help="output folder (default: runs/world)")
    wo.add_argument("--pool-per-class", type=int, default=64, help="ID pool images per class (default: 64)")
    wo.add_argument("--test-per-class", type=int, default=100, help="test images per class and domain (default: 100)")
    wo.set_defaults(func=_world)

    run = sub.add_parser("run", help="the whole pipeline in one process, from params.yaml",
                         description="world (embedded default) -> prepare -> score -> finetune (each method) -> "
                                     "evaluate -> collect -> register, one parent MLflow run with a nested run per "
                                     "step. Steps whose outputs exist for the same inputs and parameters are "
                                     "skipped. With no arguments: the embedded default (exit code 3 when the "
                                     "world's validity checks fail).")
    run.add_argument("--params", help="parameters file (default: ./params.yaml if present, else built-in defaults)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override one parameter, repeatable (e.g. --set finetune.steps=50 --set seeds=[1])")
    run.add_argument("--out", default="runs/run", help="output folder (default: runs/run)")
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (and do not register)")
    run.add_argument("--progress", action="store_true", help="progress bars for scoring, training and evaluation")
    run.set_defaults(func=_run)
