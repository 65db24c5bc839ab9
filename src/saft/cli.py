"""The ``saft`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _bench_step(args: argparse.Namespace) -> int:
    from saft.bench.step import StepBenchConfig, format_step_benchmark, run_step_benchmark

    cfg = StepBenchConfig(arch=args.arch, image_size=args.image_size, batch_size=args.batch_size,
                          num_classes=args.num_classes, density=args.density, warmup=args.warmup,
                          repeats=args.repeats, device=args.device, seed=args.seed)
    report = run_step_benchmark(cfg, progress=lambda msg: print(msg, file=sys.stderr))
    return _show_report(report, format_step_benchmark(report), args.out)


def _bench_eval(args: argparse.Namespace) -> int:
    from saft.bench.eval import EvalBenchConfig, format_eval_benchmark, run_eval_benchmark

    cfg = EvalBenchConfig(images=args.images, model=args.model, batch_size=args.batch_size, domain=args.domain,
                          data=args.data, device=args.device, threads=args.threads, seed=args.seed)
    report = run_eval_benchmark(cfg, progress=lambda msg: print(msg, file=sys.stderr))
    return _show_report(report, format_eval_benchmark(report), args.out)


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
    step = bench_sub.add_parser("step", help="per-step time and training-state memory: full vs masked-dense vs saft")
    step.add_argument("--out", help="write the JSON report here")
    step.add_argument("--arch", default="ViT-B-32", help="open_clip architecture, random init (default: ViT-B-32)")
    step.add_argument("--image-size", type=int, default=224, help="input resolution in pixels (default: 224)")
    step.add_argument("--batch-size", type=int, default=16, help="images per step (default: 16)")
    step.add_argument("--num-classes", type=int, default=10, help="class prompts through the text tower (default: 10)")
    step.add_argument("--density", type=float, default=0.001, help="mask density (default: 0.001)")
    step.add_argument("--warmup", type=int, default=2, help="untimed steps per method (default: 2)")
    step.add_argument("--repeats", type=int, default=5, help="timed steps per method; the median is reported")
    step.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    step.add_argument("--seed", type=int, default=0, help="seed for weights, data and mask (default: 0)")
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

    from saft.data.cli import register as register_data

    register_data(sub)

    from saft.steps.cli import register as register_steps

    register_steps(sub)


    from saft.world.cli import register as register_world

    register_world(sub)

    from saft.steps.register_cli import register as register_registry

    register_registry(sub)

    from saft.orchestration.cli import register as register_pipeline

    register_pipeline(sub)
    return parser


TRACKED_COMMANDS = {"world", "score", "finetune", "evaluate", "collect", "data prepare"}


def _command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, "data_command", None)
    return f"{args.command} {sub}" if args.command == "data" and sub else args.command


def _run_command(args: argparse.Namespace) -> int:
    """Run the command; a step under a tracked pipeline runner gets its own nested run."""
    name = _command_name(args)
    if name not in TRACKED_COMMANDS:
        return args.func(args)
    from saft.steps.tracked import command_context, log_outputs

    params = {k: v for k, v in vars(args).items() if k != "func" and isinstance(v, (str, int, float, bool, list))}
    with command_context(name, params) as tracker:
        code = args.func(args)
        if getattr(args, "out", None):
            log_outputs(tracker, args.out)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run_command(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        print(f"saft: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
