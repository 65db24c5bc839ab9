"""``saft pipeline compile | run --local | submit | schedule``."""

from __future__ import annotations

import argparse


def _params(args):
    from saft.steps.params import load_cli_params

    params, source = load_cli_params(args.params, args.set)
    print(f"parameters: {source}")
    return params


def _compile(args: argparse.Namespace) -> int:
    from saft.orchestration.client import compile_pipeline
    from saft.orchestration.dag import ClusterConfig

    path = compile_pipeline(args.out, ClusterConfig(image=args.image))
    print(f"wrote {path} (image {args.image})")
    return 0


def _run(args: argparse.Namespace) -> int:
    if not args.local:
        raise ValueError("saft pipeline run needs --local (use `saft pipeline submit --host URL` for a cluster)")
    from saft.orchestration.local import run_local

    summary = run_local(_params(args), args.out, tracking=not args.no_tracking, verbose=args.verbose)
    return 3 if summary.get("checks_passed") is False else 0


def _submit(args: argparse.Namespace) -> int:
    from saft.orchestration.client import submit_run

    run_id = submit_run(args.host, _params(args), package=args.package, image=args.image,
                        experiment=args.experiment, run_name=args.run_name, namespace=args.namespace,
                        token_env=args.token_env)
    print(f"submitted run {run_id} to {args.host} (experiment {args.experiment})")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from saft.orchestration.client import schedule_run

    job_id = schedule_run(args.host, _params(args), args.cron, name=args.name, package=args.package,
                          image=args.image, experiment=args.experiment, namespace=args.namespace,
                          token_env=args.token_env)
    print(f"created recurring run {job_id} ({args.name}, cron {args.cron!r}) on {args.host}")
    return 0


def _repro(args: argparse.Namespace) -> int:
    from saft.orchestration.dvc import repro

    return repro(args.dvc_args, tracking=not args.no_tracking, params_file=args.params)


def _param_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", help="parameters file (default: ./params.yaml if present, else built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, repeatable (e.g. --set finetune.steps=50)")


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    from saft.orchestration.components import DEFAULT_IMAGE

    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    p.add_argument("--package", help="compiled pipeline YAML (default: compile now)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"project image when compiling now (default: {DEFAULT_IMAGE})")
    p.add_argument("--experiment", default="saft", help="KFP experiment name (default: saft)")
    p.add_argument("--namespace", help="Kubernetes namespace of the KFP profile (multi-user installs)")
    p.add_argument("--token-env", default="KFP_TOKEN",
                   help="environment variable holding a bearer token (default: KFP_TOKEN; unset: kfp's own auth)")
    _param_flags(p)


def register(sub) -> None:
    from saft.orchestration.client import DEFAULT_PACKAGE
    from saft.orchestration.components import DEFAULT_IMAGE

    pipe = sub.add_parser("pipeline", help="the Kubeflow pipeline: compile, run locally, submit, schedule")
    psub = pipe.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    co = psub.add_parser("compile", help="write the pipeline's IR YAML",
                         description="Compiles the DAG with its cluster settings (GPU requests, secrets, /dev/shm, "
                                     "caching, retries) for one project image.")
    co.add_argument("--out", default=DEFAULT_PACKAGE, help=f"output YAML (default: {DEFAULT_PACKAGE})")
    co.add_argument("--image", default=DEFAULT_IMAGE, help=f"project image for every step (default: {DEFAULT_IMAGE})")
    co.set_defaults(func=_compile)

    run = psub.add_parser("run", help="run the pipeline on this machine with kfp.local",
                          description="The same pipeline function, each task a subprocess of this environment "
                                      "(cluster settings do not apply); prints the results table (exit code 3 "
                                      "when the embedded world's validity checks fail).")
    run.add_argument("--local", action="store_true", help="run with kfp.local's SubprocessRunner (required)")
    run.add_argument("--out", default="runs/pipeline", help="output folder (default: runs/pipeline)")
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (and do not register)")
    run.add_argument("--verbose", action="store_true",
                     help="stream kfp.local's full output (default: one line per task, everything in OUT/kfp.log)")
    _param_flags(run)
    run.set_defaults(func=_run)

    sm = psub.add_parser("submit", help="create a run on a Kubeflow Pipelines cluster")
    _cluster_flags(sm)
    sm.add_argument("--run-name", help="run name (default: chosen by KFP)")
    sm.set_defaults(func=_submit)

    sc = psub.add_parser("schedule", help="create a recurring run on a cron schedule")
    _cluster_flags(sc)
    sc.add_argument("--cron", required=True,
                    help="cron expression; KFP's 6 fields (seconds first) or a classic 5-field one, e.g. '0 3 * * *'")
    sc.add_argument("--name", default="saft-retrain", help="recurring run name (default: saft-retrain)")
    sc.set_defaults(func=_schedule)

    rp = sub.add_parser("repro", help="dvc repro as one tracked pipeline run (a nested MLflow run per stage)",
                        description="Opens the parent MLflow run, exports its id as SAFT_PARENT_RUN_ID to the "
                                    "stages, runs `dvc repro` with the given arguments and closes the run with "
                                    "dvc's status. Example: saft repro -- --force collect")
    rp.add_argument("--params", default="params.yaml", help="parameters logged on the parent run (default: params.yaml)")
    rp.add_argument("--no-tracking", action="store_true", help="plain dvc repro")
    rp.add_argument("dvc_args", nargs=argparse.REMAINDER, help="arguments for dvc repro (after --)")
    rp.set_defaults(func=_repro)
