"""``saft pipeline compile | run --local | submit | schedule | summary``, ``saft components compile``, ``saft repro``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _params(args):
    from saft.steps.params import load_cli_params

    # Without tracking there is no registry: nothing is registered, so register.* is not checked either.
    overrides = list(args.set or []) + (["register.enabled=false"] if getattr(args, "no_tracking", False) else [])
    params, source = load_cli_params(args.params, overrides)
    print(f"parameters: {source}")
    return params


OUT_DIR = "build/pipelines"


def _cluster(args, params=None, image: str | None = None):
    """The compile-time settings: cluster.* of the parameters and the project image (``--image``/``$SAFT_IMAGE``)."""
    from saft.images import resolve_image
    from saft.orchestration.cluster import ClusterConfig

    if params is None:
        from saft.steps.params import load_cli_params

        params, _ = load_cli_params(args.params, args.set)
    if image is None and getattr(args, "package", None):
        image = "(from the package)"  # a compiled package carries its image
    return ClusterConfig.from_params(params, image=image or resolve_image(args.image))


def _names(args) -> list[str]:
    from saft.orchestration.repository import pipeline_names

    return pipeline_names(args.repo) if getattr(args, "all", False) else [args.pipeline]


def _compile(args: argparse.Namespace) -> int:
    from saft.orchestration.client import compile_pipeline
    from saft.images import SNAPSHOT_IMAGE
    from saft.orchestration.repository import package_path

    names = _names(args)
    if args.snapshot:
        if args.image or args.out or args.out_dir != OUT_DIR:
            raise ValueError("--snapshot rewrites the reviewed pipelines/<name>/pipeline.yaml for the placeholder image "
                             "only: drop --image, --out and --out-dir")
        cfg, targets = _cluster(args, image=SNAPSHOT_IMAGE), {n: package_path(n, args.repo) for n in names}
    else:
        cfg = _cluster(args)
        if args.out and len(names) > 1:
            raise ValueError("--out names one file: compile one --pipeline with it, or every one with --all --out-dir")
        targets = {n: Path(args.out) if args.out else Path(args.out_dir) / f"{n}.yaml" for n in names}
    for name, target in targets.items():
        path = compile_pipeline(name, target, cfg, args.repo)
        print(f"wrote {path} ({name}, image {cfg.image})")
    return 0


def _components(args: argparse.Namespace) -> int:
    from saft.images import SNAPSHOT_IMAGE, resolve_image
    from saft.orchestration.library import compile_components

    if args.snapshot:
        if args.image or args.out_dir:
            raise ValueError("--snapshot rewrites the reviewed components/ for the placeholder image only: drop --image "
                             "and --out-dir")
        folders = compile_components(SNAPSHOT_IMAGE, None, args.repo)
    else:
        folders = compile_components(resolve_image(args.image), args.out_dir or f"{OUT_DIR}/components", args.repo)
    for folder in folders:
        print(f"wrote {folder}/component.yaml, README.md")
    return 0


def _run(args: argparse.Namespace) -> int:
    if not args.local:
        raise ValueError("saft pipeline run needs --local (use `saft pipeline submit --host URL` for a cluster)")
    from saft.orchestration.local import run_local

    if args.repo:
        import os

        os.environ["SAFT_REPO"] = args.repo
    summary = run_local(_params(args), args.out, pipeline=args.pipeline, tracking=not args.no_tracking,
                        verbose=args.verbose, cache=args.cache)
    return 3 if summary.get("checks_passed") is False else 0


def _write_summary(args, run_id: str, state: str) -> None:
    from saft.io import atomic_path
    from saft.orchestration.summary import run_summary

    text = run_summary(run_id, state, pipeline=args.pipeline, revision=getattr(args, "revision_note", ""))
    for target in args.summary:
        path = Path(target)
        if path.exists() and not path.is_file():
            raise ValueError(f"--summary {target}: not a file")
        if target == "-":
            print(text)
            continue
        if path.exists():  # a job summary file collects the output of several steps: append
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")
        else:
            with atomic_path(path) as tmp:
                tmp.write_text(text + "\n", encoding="utf-8")
        print(f"wrote the run summary to {target}")


def apply_revision(params, revision: str, data_repo: str = "") -> str:
    """A triggering commit as the run's data revision, when data.root is data DVC tracks here.

    Then the pipeline reads data.root from ``data_repo`` (the repository's git URL) at that
    commit. Any other root (the world, an S3 prefix, a mounted folder) is versioned by its
    content; the commit is then only reported. Returns what was done, for the log.
    """
    root = params.data.root
    if not revision:
        return ""
    if not root or root.startswith("s3://"):
        return f"revision {revision}: recorded (data.root {root or '(the embedded world)'} is versioned by content)"
    from saft.steps.data_version import DataVersionError, dvc_storage

    try:
        tracked = dvc_storage(root, rev=revision) is not None
    except DataVersionError:
        tracked = False
    if not tracked:
        return f"revision {revision}: recorded ({root} is not data DVC tracks at that commit)"
    if not (data_repo or params.data.repo):
        raise ValueError(f"{root} is DVC-tracked: pass --data-repo URL (the git repository the pipeline's pods read it "
                         "from at that commit)")
    params.data.rev, params.data.repo = revision, data_repo or params.data.repo
    return f"revision {revision}: data.rev for the DVC-tracked {root} (read from {params.data.repo})"


def _submit(args: argparse.Namespace) -> int:
    from saft.orchestration.client import FINISHED_STATES, submit_run, wait_for_run

    params = _params(args)
    note = apply_revision(params, args.revision, args.data_repo)
    if note:
        print(note)
    args.revision_note = args.revision or params.data.rev
    run_id = submit_run(args.host, args.pipeline, params, package=args.package, cfg=_cluster(args, params),
                        experiment=args.experiment, run_name=args.run_name, namespace=args.namespace,
                        token_env=args.token_env)
    print(f"submitted run {run_id} of the {args.pipeline} pipeline to {args.host} (experiment {args.experiment})")
    if args.run_id_file:
        Path(args.run_id_file).write_text(run_id + "\n")
    if not args.wait:
        return 0
    print(f"waiting for run {run_id} (at most {args.timeout:.0f} s)", flush=True)
    try:
        state = wait_for_run(args.host, run_id, args.timeout, token_env=args.token_env, namespace=args.namespace,
                             poll_s=args.poll)
    except TimeoutError as exc:
        print(f"saft: {exc}", file=sys.stderr)
        state = "STILL RUNNING"
    print(f"run {run_id}: {state}")
    if args.summary:
        _write_summary(args, run_id, state)
    return 0 if state == "SUCCEEDED" else (1 if state in FINISHED_STATES else 4)


def _summary(args: argparse.Namespace) -> int:
    args.revision_note = args.revision
    _write_summary(args, args.run_id, args.state)
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from saft.orchestration.client import schedule_run

    params = _params(args)
    job_id = schedule_run(args.host, args.pipeline, params, args.cron, job_name=args.name, package=args.package,
                          cfg=_cluster(args, params), experiment=args.experiment, namespace=args.namespace,
                          token_env=args.token_env)
    print(f"created recurring run {job_id} ({args.name}: the {args.pipeline} pipeline, cron {args.cron!r}) "
          f"on {args.host}")
    return 0


def _repro(args: argparse.Namespace) -> int:
    from saft.orchestration.dvc import repro

    return repro(args.dvc_args, tracking=not args.no_tracking, params_file=args.params)


def _param_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", help="parameters file (default: ./params.yaml if present, else built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter, repeatable (e.g. --set finetune.steps=50)")


def _repo_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", help="checkout holding components/ and pipelines/ (default: $SAFT_REPO, the checkout "
                                  "saft is installed from, or the nearest one above the working folder)")


def _pipeline_flag(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--pipeline", default=default, metavar="NAME",
                   help=f"pipelines/NAME/pipeline.py: benchmark (SAFT vs baselines over seeds), retrain "
                        f"(production: lr grid, selection, gate, deploy) or base2new (one training per dataset, "
                        f"HM per dataset and averaged; data.subset: base) (default: {default})")


def _image_flag(p: argparse.ArgumentParser, what: str) -> None:
    from saft.images import IMAGE_ENV

    p.add_argument("--image", help=f"project image {what}, e.g. REGISTRY/saft:TAG as docker/Dockerfile builds it "
                                   f"(default: ${IMAGE_ENV}; nothing is published for you)")


def _cluster_flags(p: argparse.ArgumentParser, default_pipeline: str) -> None:
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    _pipeline_flag(p, default_pipeline)
    p.add_argument("--package", help="compiled pipeline YAML (default: compile now, for --image)")
    _image_flag(p, "when compiling now")
    p.add_argument("--experiment", default="saft", help="KFP experiment name (default: saft)")
    p.add_argument("--namespace", help="Kubernetes namespace of the KFP profile (multi-user installs)")
    p.add_argument("--token-env", default="KFP_TOKEN",
                   help="environment variable holding a bearer token (default: KFP_TOKEN; unset: kfp's own auth)")
    _param_flags(p)
    _repo_flag(p)


def register(sub) -> None:
    pipe = sub.add_parser("pipeline", help="the Kubeflow pipelines: compile, run locally, submit, schedule",
                          description="The pipelines of pipelines/<name>/pipeline.py: benchmark (the comparison "
                                      "of SAFT, full fine-tuning and a random mask over seeds), retrain "
                                      "(production retraining on a data version: SAFT over a learning-rate grid, "
                                      "the rate chosen on ID validation, the promotion gate, deploy) and base2new "
                                      "(one training per dataset on its base classes, harmonic mean per dataset "
                                      "and averaged).")
    psub = pipe.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    co = psub.add_parser("compile", help="write a pipeline's IR YAML",
                         description="Compiles the DAG with its cluster settings (resources, GPU requests, secrets, "
                                     "/dev/shm, checkpoint PVC, caching, retries, loop parallelism from "
                                     "cluster.* in params.yaml) for one project image.")
    _pipeline_flag(co, "benchmark")
    co.add_argument("--all", action="store_true", help="every pipeline, each into OUT_DIR/<name>.yaml")
    co.add_argument("--out", help="output YAML of one --pipeline (default: OUT_DIR/<name>.yaml)")
    co.add_argument("--out-dir", default=OUT_DIR, help=f"folder of the compiled pipelines (default: {OUT_DIR})")
    _image_flag(co, "every step runs")
    co.add_argument("--snapshot", action="store_true",
                    help="rewrite the reviewed pipelines/<name>/pipeline.yaml (placeholder image) after a change to "
                         "a pipeline or component, for review; tests compare the checkout with it")
    _param_flags(co)
    _repo_flag(co)
    co.set_defaults(func=_compile)

    run = psub.add_parser("run", help="run a pipeline on this machine with kfp.local",
                          description="The same pipeline function, each task a subprocess of this environment "
                                      "(cluster settings do not apply); prints the results table and the decisions "
                                      "(exit code 3 when the embedded world's validity checks fail).")
    run.add_argument("--local", action="store_true", help="run with kfp.local's SubprocessRunner (required)")
    _pipeline_flag(run, "benchmark")
    run.add_argument("--out", default="runs/pipeline", help="output folder (default: runs/pipeline)")
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (and do not register)")
    run.add_argument("--cache", action="store_true",
                     help="serve unchanged tasks from kfp.local's cache (OUT/kfp/.kfp_cache); its keys cover the "
                          "components and their inputs, not the library code")
    run.add_argument("--verbose", action="store_true",
                     help="stream kfp.local's full output (default: one line per task, everything in OUT/kfp.log)")
    _param_flags(run)
    _repo_flag(run)
    run.set_defaults(func=_run)

    sm = psub.add_parser("submit", help="create a run on a Kubeflow Pipelines cluster (and wait for it)",
                         description="Compiles the pipeline for --image (or takes --package), turns the parameters "
                                     "(--params, --set) into its arguments and creates a run in --experiment; with "
                                     "--wait, waits and exits 0 only when the run succeeded.")
    _cluster_flags(sm, "benchmark")
    sm.add_argument("--run-name", help="run name (default: chosen by KFP)")
    sm.add_argument("--run-id-file", help="write the run id to this file")
    sm.add_argument("--revision", default="",
                    help="git commit that triggered the run (CI): becomes data.rev when data.root is a folder DVC "
                         "tracks in this repository, so the run reads the data of that commit")
    sm.add_argument("--data-repo", default="", help="git URL the pipeline reads DVC-tracked data from (with --revision)")
    sm.add_argument("--wait", action="store_true", help="wait for the run to finish (exit 1 if it did not succeed)")
    sm.add_argument("--timeout", type=float, default=4 * 3600, help="longest wait in seconds (default: 14400)")
    sm.add_argument("--poll", type=float, default=30, help="seconds between status checks (default: 30)")
    sm.add_argument("--summary", action="append", default=[], metavar="FILE",
                    help="after --wait, write the results table and registry decision (read from MLflow) as "
                         "Markdown to FILE (appended when it exists, e.g. $GITHUB_STEP_SUMMARY; '-' prints); "
                         "repeatable")
    sm.set_defaults(func=_submit)

    sc = psub.add_parser("schedule", help="create a recurring run on a cron schedule (default: the retrain pipeline)",
                         description="A KFP recurring run of the pipeline compiled for --image (or --package) with "
                                     "the parameters of --params/--set: the scheduled retraining; each run reads the "
                                     "data version current at its start.")
    _cluster_flags(sc, "retrain")
    sc.add_argument("--cron", required=True,
                    help="cron expression; KFP's 6 fields (seconds first) or a classic 5-field one, e.g. '0 3 * * *'")
    sc.add_argument("--name", default="saft-retrain", help="recurring run name (default: saft-retrain)")
    sc.set_defaults(func=_schedule)

    su = psub.add_parser("summary", help="a finished run's results table and registry decision, as Markdown",
                         description="Reads the run's parent MLflow run (tagged with the KFP run id) through "
                                     "MLFLOW_TRACKING_URI.")
    su.add_argument("--run-id", required=True, help="KFP run id")
    su.add_argument("--state", default="SUCCEEDED", help="the run's final state, shown in the title")
    su.add_argument("--revision", default="", help="data revision that triggered the run, shown in the summary")
    _pipeline_flag(su, "retrain")
    su.add_argument("--summary", action="append", default=["-"], metavar="FILE", help="output file ('-': print)")
    su.set_defaults(func=_summary)

    comp = sub.add_parser("components", help="the component library: compile components/<name>/component.yaml")
    csub = comp.add_subparsers(dest="components_command", required=True, metavar="ACTION")
    cc = csub.add_parser("compile", help="compile every component and write its README",
                         description="Writes components/<name>/component.yaml (loadable with "
                                     "kfp.components.load_component_from_file) and README.md for each "
                                     "components/<name>/component.py.")
    _image_flag(cc, "the components run")
    cc.add_argument("--out-dir", help=f"output root (default: {OUT_DIR}/components)")
    cc.add_argument("--snapshot", action="store_true",
                    help="rewrite the reviewed components/<name>/component.yaml and README.md (placeholder image)")
    _repo_flag(cc)
    cc.set_defaults(func=_components)

    rp = sub.add_parser("repro", help="dvc repro as one tracked pipeline run (a nested MLflow run per stage)",
                        description="Opens the parent MLflow run, exports its id as SAFT_PARENT_RUN_ID to the "
                                    "stages, runs `dvc repro` with the given arguments and closes the run with "
                                    "dvc's status. Example: saft repro -- --force collect")
    rp.add_argument("--params", default="params.yaml", help="parameters logged on the parent run (default: params.yaml)")
    rp.add_argument("--no-tracking", action="store_true", help="plain dvc repro")
    rp.add_argument("dvc_args", nargs=argparse.REMAINDER, help="arguments for dvc repro (after --)")
    rp.set_defaults(func=_repro)
