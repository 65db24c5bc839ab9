"""The step commands: ``saft world``, ``score``, ``finetune``, ``evaluate``, ``collect`` and ``run``."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from saft.config import add_arguments, from_arguments
from saft.steps.configs import EvaluateConfig, FinetuneStepConfig, ScoreConfig, WiseftConfig


def _main_rank() -> bool:
    """Under torchrun only rank 0 reports (every rank runs the same step)."""
    return int(os.environ.get("RANK", "0")) == 0



def _score(args: argparse.Namespace) -> int:
    from saft.steps.configs import ScoreConfig
    from saft.steps.score import score_step

    stats = score_step(from_arguments(ScoreConfig, args), args.data, args.out, root=args.root)
    if not _main_rank():
        return 0
    top = sorted(stats["per_tensor"].items(), key=lambda kv: -kv[1]["selected"])[:5]
    print(f"mask: {stats['num_selected']:,} of {stats['eligible']:,} entries "
          f"({stats['density']:.4%}) in {stats['tensors_with_selection']} of {stats['tensors_eligible']} tensors")
    print("most selected: " + ", ".join(f"{n} ({v['selected']:,})" for n, v in top))
    print(f"wrote {args.out}/mask.safetensors, mask_stats.json, score.json")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from saft.steps.configs import FinetuneStepConfig
    from saft.steps.finetune import finetune_step

    cfg = from_arguments(FinetuneStepConfig, args)
    summary = finetune_step(cfg, args.data, args.out, mask_path=args.mask, root=args.root, resume=args.resume,
                            checkpoint_dir=args.checkpoint_dir)
    if not _main_rank():
        return 0
    print(f"{cfg.method}: {summary['trained_values']:,} trained values at lr {summary['config']['lr']:g}, final loss "
          f"{summary['final_loss']:.4f}, {summary['seconds']:.1f} s")
    print(f"wrote {args.out}/delta.safetensors, history.json, finetune.json")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from saft.eval.report import fmt
    from saft.eval.suites import load_suite
    from saft.steps.configs import DeltaRun, EvaluateConfig
    from saft.steps.evaluate import evaluate_suite

    cfg = from_arguments(EvaluateConfig, args, deltas=[DeltaRun.parse(d) for d in args.delta])
    doc = evaluate_suite(cfg, load_suite(cfg.suite, cfg.data_root or None), args.out)
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


def _wiseft(args: argparse.Namespace) -> int:
    from saft.sparse.distributed import resolve_device
    from saft.layout import WISEFT_OUT
    from saft.steps.wiseft import wiseft_step

    cfg = from_arguments(WiseftConfig, args)
    doc = wiseft_step(replace(cfg, device=resolve_device(cfg.device)), args.data, args.delta, args.out,
                      root=args.root)
    print(f"wiseft: alpha {doc['chosen_alpha']:g} chosen on {doc['val_images']} ID validation images "
          f"(top-1 {100 * doc['chosen_val_top1']:.1f}); evaluate it with "
          f"--delta wiseft@{doc['chosen_alpha']:g}={args.delta}")
    print(f"wrote {args.out}/{WISEFT_OUT.record}, {WISEFT_OUT.plot}")
    return 0


def _world(args: argparse.Namespace) -> int:
    from saft.steps.params import WorldParams
    from saft.steps.world import world_fingerprint_status, world_step

    if args.sheet:
        from saft.world.task import contact_sheet

        print(f"wrote {contact_sheet(args.sheet, args.version)} (two pool images per class and domain)")
        return 0
    if args.fingerprint:
        status = world_fingerprint_status(args.version)
        print(status["text"])
        return 0 if status["matches"] is not False else 1
    task = WorldParams()
    summary = world_step(args.out, WorldParams(pool_per_class=args.pool_per_class or task.pool_per_class,
                                               test_per_class=args.test_per_class or task.test_per_class),
                         version=args.version)
    print(f"world {summary['version']} in {summary['root']}: train pool {summary['train_root']}, "
          f"suite {summary['suite']}")
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
    from saft.orchestration.run import run_pipeline

    # Without tracking there is no registry: nothing is registered, so register.* is not checked either.
    overrides = list(args.set or []) + (["register.enabled=false"] if args.no_tracking else [])
    params, source = load_cli_params(args.params, overrides)
    print(f"parameters: {source}")
    summary = run_pipeline(params, args.out, tracking=not args.no_tracking, progress=args.progress)
    return 3 if summary.get("checks_passed") is False else 0


def _params_show(args: argparse.Namespace) -> int:
    from saft.steps.params import PipelineParams, load_cli_params, render

    if args.defaults:
        print(render(PipelineParams()), end="")
        return 0
    params, source = load_cli_params(args.params, args.set)
    print(render(params, header=f"# Resolved parameters: {source}\n"), end="")
    return 0


def _io(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared data folder (from `saft data prepare`)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--root", help="dataset root, overriding the one recorded in the data folder")


def register(sub) -> None:
    from saft.world.spec import DEFAULT_WORLD, WORLDS

    score = sub.add_parser("score", help="score parameter entries and write the SAFT mask",
                           description="Phase I of SAFT: gradients of the downstream loss at the pre-trained "
                                       "weights over the training manifest; keep the top entries.")
    _io(score)
    add_arguments(score, ScoreConfig)
    score.set_defaults(func=_score)

    ft = sub.add_parser("finetune", help="fine-tune (saft, random, full, lora or lpft) and write the delta",
                        description="Phase II of SAFT, or the methods it is compared with (docs/methods.md): trains "
                                    "the mask's entries (saft, random), every eligible parameter (full), PEFT LoRA "
                                    "adapters (lora: a low-rank delta), or a linear probe then every eligible "
                                    "parameter (lpft: a dense delta plus class-head offsets); writes base-relative "
                                    "deltas.")
    _io(ft)
    ft.add_argument("--mask", help="mask file from `saft score` (saft and random; the other methods take none)")
    ft.add_argument("--resume", action="store_true", help="continue from the checkpoint folder after an interruption")
    ft.add_argument("--checkpoint-dir",
                    help="checkpoint folder (default: OUT/checkpoints; a pipeline task keys it by the run, so a "
                         "retry in a fresh pod finds it)")
    add_arguments(ft, FinetuneStepConfig)
    ft.set_defaults(func=_finetune)

    ev = sub.add_parser("evaluate", help="top-1 on an evaluation suite for the base and base + alpha * delta",
                        description="Zero-shot heads from each dataset's class names and templates; writes "
                                    "metrics.json (one record per model x dataset x seed x alpha, plus "
                                    "aggregates) and a Markdown/HTML report with plots.")
    ev.add_argument("--out", required=True, help="output folder (created if missing)")
    ev.add_argument("--delta", action="append", default=[], metavar="NAME[:SEED][@ALPHA]=PATH",
                    help="a delta to evaluate, repeatable (e.g. saft:1=runs/s1/saft/delta.safetensors); @ALPHA "
                         "evaluates it at that one weight instead of --alpha (WiSE-FT: "
                         "wiseft:1@0.6=runs/s1/full/delta.safetensors)")
    add_arguments(ev, EvaluateConfig)
    ev.set_defaults(func=_evaluate)

    co = sub.add_parser("collect", help="merge evaluation parts into one metrics.json, report and results table",
                        description="Merges the metrics.json files of `saft evaluate --only` parts (records "
                                    "concatenated, aggregates recomputed), writes the report, results.json and "
                                    "results.md; on the synthshift suite also the world's validity checks "
                                    "(exit code 3 when one fails).")
    co.add_argument("metrics", nargs="+", help="metrics.json files (or folders holding one) to merge")
    co.add_argument("--delta", action="append", default=[], metavar="NAME[:SEED][@ALPHA]=PATH",
                    help="the evaluated deltas, for the table's trainable-values and size columns (repeatable)")
    co.add_argument("--out", required=True, help="output folder (created if missing)")
    co.set_defaults(func=_collect)

    wi = sub.add_parser("wiseft", help="WiSE-FT: choose the alpha of a full fine-tuning delta on ID validation",
                        description="Scores base + alpha * delta (a `saft finetune --method full` delta) on the "
                                    "prepared ID validation split for each alpha and keeps the best (ties to the "
                                    "smaller alpha; Wortsman et al. 2022). Writes wiseft.json and wiseft.png.")
    _io(wi)
    wi.add_argument("--delta", required=True, help="the full fine-tuning delta.safetensors")
    add_arguments(wi, WiseftConfig)
    wi.set_defaults(func=_wiseft)

    wo = sub.add_parser("world", help="render the embedded world (the default data) into a folder",
                        description="Deterministic: the same sizes give the same images; existing images are "
                                    "kept. Writes the ID pool (<id domain>/pool), test sets per domain, the "
                                    "synthshift suite files and world.json (the version). docs/world.md "
                                    "describes the versions.")
    wo.add_argument("--out", default="runs/world", help="output folder (default: runs/world)")
    wo.add_argument("--version", choices=list(WORLDS), default=DEFAULT_WORLD,
                    help=f"world version (default: {DEFAULT_WORLD}; the pipelines render the default)")
    wo.add_argument("--fingerprint", action="store_true",
                    help="print the version's fingerprint with the shipped model and compare it with the frozen "
                         "one (exit 1 if they differ); renders nothing")
    wo.add_argument("--sheet", metavar="PNG", help="write a contact sheet of the version's domains and classes "
                                                   "to PNG instead of rendering the world")
    wo.add_argument("--pool-per-class", type=int, default=0,
                    help="ID pool images per class (default: 0 = the version's, 64)")
    wo.add_argument("--test-per-class", type=int, default=0,
                    help="test images per class and domain (default: 0 = the version's, 100)")
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

    pa = sub.add_parser("params", help="show the run parameters: every key, its value and its help",
                        description="params.yaml is generated from the parameters' definitions: `saft params show "
                                    "--defaults > params.yaml` writes every default with its help.")
    pa_sub = pa.add_subparsers(dest="params_command", required=True, metavar="PARAMS_COMMAND")
    show = pa_sub.add_parser("show", help="the resolved parameters (file + --set + defaults) as commented YAML")
    show.add_argument("--params", help="parameters file (default: ./params.yaml if present, else built-in defaults)")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override one parameter, repeatable (e.g. --set finetune.steps=50)")
    show.add_argument("--defaults", action="store_true", help="the built-in defaults, ignoring any params.yaml")
    show.set_defaults(func=_params_show)
