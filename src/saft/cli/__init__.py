"""The ``saft`` command line."""

from __future__ import annotations

import argparse
import os
import sys


def _bench_step(args: argparse.Namespace) -> int:
    from saft.bench.step import StepBenchConfig, format_step_benchmark, run_step_benchmark

    cfg = StepBenchConfig(arch=args.arch, image_size=args.image_size, batch_size=args.batch_size,
                          num_classes=args.num_classes, density=args.density, warmup=args.warmup,
                          repeats=args.repeats, device=args.device, seed=args.seed, precision=args.precision,
                          text_batch=args.text_batch, peft=not args.no_peft, lora_rank=args.lora_rank,
                          value_grads=args.value_grad or [])
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1:
        from saft.bench.step_dist import (
            format_dist_step_benchmark,
            run_dist_step_benchmark,
        )

        report = run_dist_step_benchmark(cfg, args.nproc, progress=lambda msg: print(msg, file=sys.stderr))
        return _show_report(report, format_dist_step_benchmark(report), args.out)
    report = run_step_benchmark(cfg, progress=lambda msg: print(msg, file=sys.stderr))
    return _show_report(report, format_step_benchmark(report), args.out)


def _bench_eval(args: argparse.Namespace) -> int:
    from saft.bench.eval import EvalBenchConfig, format_eval_benchmark, run_eval_benchmark

    cfg = EvalBenchConfig(images=args.images, model=args.model, batch_size=args.batch_size, domain=args.domain,
                          data=args.data, device=args.device, threads=args.threads, seed=args.seed)
    report = run_eval_benchmark(cfg, progress=lambda msg: print(msg, file=sys.stderr))
    return _show_report(report, format_eval_benchmark(report), args.out)


def _bench_scale(args: argparse.Namespace) -> int:
    from saft.bench.scale import ScaleBenchConfig, format_scale_benchmark, run_scale_benchmark

    cfg = ScaleBenchConfig(arch=args.arch, image_size=args.image_size, batch_size=args.batch_size,
                           score_batches=args.score_batches, classes=args.classes, small_classes=args.small_classes,
                           old_class_counts=args.old_classes, old_score_batches=args.old_score_batches,
                           text_sample_classes=args.text_sample_classes, text_batch=args.text_batch,
                           warmup=args.warmup, device=args.device, threads=args.threads, seed=args.seed)
    report = run_scale_benchmark(cfg, progress=lambda msg: print(msg, file=sys.stderr))
    return _show_report(report, format_scale_benchmark(report), args.out)


def _bench_serve(args: argparse.Namespace) -> int:
    from saft.bench.serve import ServeBenchConfig, format_serve_benchmark, run_serve_benchmark

    cfg = ServeBenchConfig(model=args.model, classes=args.classes, templates=args.templates, clients=args.clients,
                           requests=args.requests, images_per_request=args.images_per_request,
                           duration_s=args.duration, max_batch=args.max_batch, startup_repeats=args.startup_repeats,
                           baseline=not args.no_baseline, threads=args.threads, protocol=args.protocol,
                           hostile=args.hostile)
    report = run_serve_benchmark(cfg, progress=lambda msg: print(msg, file=sys.stderr))
    return _show_report(report, format_serve_benchmark(report), args.out)


def _show_report(report: dict, text: str, out: str | None) -> int:
    """Print a benchmark's table; with ``out``, also write its report as JSON."""
    from saft.io import write_json

    print(text)
    if out:
        write_json(out, report)
        print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from saft.version import __version__

    parser = argparse.ArgumentParser(prog="saft", description="Sparse Adaptation for Fine-Tuning of CLIP models.")
    parser.add_argument("--version", action="version", version=f"saft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = sub.add_parser("bench", help="benchmarks against baselines measured in the same run")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    step = bench_sub.add_parser("step", help="per-step time and training state, rounds interleaved in one process: "
                                             "full, masked-dense, saft, the floor, PEFT LoRA and SHiRA")
    step.add_argument("--out", help="write the JSON report here")
    step.add_argument("--arch", default="ViT-B-32", help="open_clip architecture, random init (default: ViT-B-32)")
    step.add_argument("--image-size", type=int, default=224, help="input resolution in pixels (default: 224)")
    step.add_argument("--batch-size", type=int, default=16, help="images per step (default: 16)")
    step.add_argument("--num-classes", type=int, default=10, help="class prompts through the text tower (default: 10)")
    step.add_argument("--density", type=float, default=0.001, help="mask density (default: 0.001)")
    step.add_argument("--warmup", type=int, default=2, help="untimed rounds (one step of every method each; default: 2)")
    step.add_argument("--repeats", type=int, default=5,
                      help="timed rounds (one step of every method each, order rotated); the median is reported "
                           "(default: 5)")
    step.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                      help="fp32, or bf16 autocast for every method (default: fp32)")
    step.add_argument("--text-batch", type=int, default=0,
                      help="prompts per text chunk, as finetune's --text-batch; more prompts than this are encoded "
                           "without a graph and re-encoded chunk by chunk (default: 0 = 8 per image, 32-2048)")
    step.add_argument("--no-peft", action="store_true", help="leave out PEFT LoRA and SHiRA (default: measured "
                                                             "when peft is installed)")
    step.add_argument("--lora-rank", type=int, default=8, help="PEFT LoRA rank (default: 8)")
    step.add_argument("--value-grad", action="append", choices=("gather", "product", "dense"),
                      help="also measure saft with this value-gradient strategy forced on every tensor "
                           "(repeatable; saft itself picks per tensor by cost)")
    step.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    step.add_argument("--seed", type=int, default=0, help="seed for weights, data and mask (default: 0)")
    step.add_argument("--nproc", type=int, default=1,
                      help="N >= 2: the saft step as N torchrun processes (gloo on CPU, NCCL on GPUs) each on "
                           "batch/N images, vs one process at the same global batch: time, state, bytes "
                           "all-reduced, equality of the trained values (default: 1, the methods' comparison)")
    step.set_defaults(func=_bench_step)
    ev = bench_sub.add_parser("eval", help="evaluation images/s and peak memory: saft's streaming path vs a plain "
                                         "open_clip loop, on a generated image set")
    ev.add_argument("--out", help="write the JSON report here")
    ev.add_argument("--images", type=int, default=20_000, help="images to generate and evaluate (default: 20000)")
    ev.add_argument("--model", default="tiny", help="model spec (default: tiny, the shipped embedded-world model)")
    ev.add_argument("--batch-size", type=int, default=128, help="images per batch for both paths (default: 128)")
    ev.add_argument("--domain", default="photo", help="saft.data.synth domain to render (default: photo)")
    ev.add_argument("--data", help="generate into (and reuse) this folder instead of a temporary one")
    ev.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ev.add_argument("--threads", type=int, default=0, help="torch threads per measuring process (default: torch's)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the rendered images (default: 0)")
    ev.set_defaults(func=_bench_eval)
    sc = bench_sub.add_parser("scale", help="the text side at ImageNet scale (1000 classes x 80 templates): "
                                            "scoring, a training step and text encoding, before vs now")
    sc.add_argument("--out", help="write the JSON report here")
    sc.add_argument("--arch", default="ViT-B-16", help="open_clip architecture, random init (default: ViT-B-16)")
    sc.add_argument("--image-size", type=int, default=224, help="input resolution in pixels (default: 224)")
    sc.add_argument("--batch-size", type=int, default=4, help="images per batch (default: 4; on a GPU e.g. 64)")
    sc.add_argument("--score-batches", type=int, default=16, help="batches of the scoring pass (default: 16)")
    sc.add_argument("--classes", type=int, default=1000, help="class count of the large setting (default: 1000)")
    sc.add_argument("--small-classes", type=int, default=10, help="class count the training peak is compared with")
    sc.add_argument("--old-classes", type=int, nargs="+", default=[1, 2],
                    help="class counts (x 80 templates) at which the old path is measured (default: 1 2)")
    sc.add_argument("--old-score-batches", type=int, default=2, help="batches timed for the old scoring path")
    sc.add_argument("--text-sample-classes", type=int, default=8,
                    help="classes (x 80 templates) of the text-encoding sample (default: 8)")
    sc.add_argument("--text-batch", type=int, default=0,
                    help="prompts encoded at once (default: 0, the library's 8 per image)")
    sc.add_argument("--warmup", type=int, default=1, help="untimed training steps before the timed one")
    sc.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    sc.add_argument("--threads", type=int, default=0, help="torch threads per measuring process (default: torch's)")
    sc.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    sc.set_defaults(func=_bench_scale)
    sv = bench_sub.add_parser("serve", help="serving start-up and load on 127.0.0.1: saft serve vs mlflow models "
                                            "serve, same model, same run")
    sv.add_argument("--out", help="write the JSON report here")
    sv.add_argument("--model", default="tiny", help="base model spec (default: tiny)")
    sv.add_argument("--classes", type=int, default=10, help="served classes (default: 10)")
    sv.add_argument("--templates", type=int, default=2, help="prompt templates per class (default: 2)")
    sv.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    sv.add_argument("--requests", type=int, default=200, help="requests per server (default: 200)")
    sv.add_argument("--images-per-request", type=int, default=4, help="images per request (default: 4)")
    sv.add_argument("--duration", type=float, default=120.0, help="at most this many seconds of load per server")
    sv.add_argument("--max-batch", type=int, default=32, help="saft serve's batch size (default: 32)")
    sv.add_argument("--startup-repeats", type=int, default=3, help="start-up measurements each (default: 3)")
    sv.add_argument("--threads", type=int, default=0, help="torch threads of each server (default: torch's)")
    sv.add_argument("--no-baseline", action="store_true", help="measure saft serve only")
    sv.add_argument("--protocol", choices=["v1", "v2"], default="v1",
                    help="saft serve's request form: v1 :predict (base64 JSON) or v2 /infer (binary tensor data)")
    sv.add_argument("--hostile", action="store_true",
                    help="also measure saft serve under stalled clients, a large request beside a small one, and "
                         "large images with and without the decode memory budget")
    sv.set_defaults(func=_bench_serve)

    from saft.cli.data import register as register_data

    register_data(sub)

    from saft.cli.steps import register as register_steps

    register_steps(sub)


    from saft.cli.world import register as register_world

    register_world(sub)

    from saft.cli.protocols import register as register_protocols

    register_protocols(sub)

    from saft.cli.register import register as register_registry

    register_registry(sub)

    from saft.cli.serving import register as register_serving

    register_serving(sub)

    from saft.cli.pipeline import register as register_pipeline

    register_pipeline(sub)
    return parser


TRACKED_COMMANDS = {"world", "score", "finetune", "evaluate", "collect", "data prepare"}


def _command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, "data_command", None)
    return f"{args.command} {sub}" if args.command == "data" and sub else args.command


def _run_command(args: argparse.Namespace) -> int:
    """Run the command; a step under a tracked pipeline runner gets its own nested run."""
    name = _command_name(args)
    if name not in TRACKED_COMMANDS or int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 tracks
        return args.func(args)
    from saft.steps.tracked import command_context, log_outputs

    params = {k: v for k, v in vars(args).items() if k != "func" and isinstance(v, (str, int, float, bool, list))}
    with command_context(name, params) as tracker:
        code = args.func(args)
        if getattr(args, "out", None):
            log_outputs(tracker, args.out)
    return code


def main(argv: list[str] | None = None) -> int:
    if not sys.stderr.isatty():  # a log file or a pipeline task's output: no redrawn progress bars in it
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from saft.tracking.config import redact, use_store

    args = build_parser().parse_args(argv)
    try:
        with use_store():  # one tracking store for this command, its threads and its child processes
            return _run_command(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        print(f"saft: error: {redact(str(exc))}", file=sys.stderr)  # a message may quote a tracking URI
        return 2
