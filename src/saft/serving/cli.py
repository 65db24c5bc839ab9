"""``saft serve`` (the HTTP endpoint of a registered model) and ``saft deploy`` (KServe rollout)."""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    import logging
    import os

    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. With the decode
    # threads beside the model's, spinning teams starved them (measured with `saft bench serve`
    # on 2 cores: several times fewer requests per second).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from saft.serving.fetch import FetchPolicy
    from saft.serving.protocol import MiB, Limits
    from saft.serving.server import ServeConfig, serve
    from saft.tracking.registry import check_model_uri

    check_model_uri(args.model_uri)  # a name the store does not have fails here, naming the store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = Limits(max_body_bytes=int(args.max_body_mb * MiB), max_instances=args.max_instances,
                    max_image_bytes=int(args.max_image_mb * MiB), max_image_pixels=args.max_image_pixels)
    policy = FetchPolicy(enabled=args.allow_urls, allow_hosts=tuple(args.url_allow_host),
                         allow_private=args.url_allow_private, max_bytes=int(args.max_image_mb * MiB),
                         timeout_s=args.url_timeout)
    cfg = ServeConfig(model_uri=args.model_uri, name=args.name, host=args.host, port=args.port, device=args.device,
                      precision=args.precision, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                      decode_workers=args.decode_workers, max_concurrent=args.max_concurrent, limits=limits,
                      policy=policy, threads=args.threads)
    return serve(cfg)


def _deploy(args: argparse.Namespace) -> int:
    from saft.serving.kserve import PredictorSettings
    from saft.serving.rollout import FAILED, ROLLED_BACK, RolloutConfig
    from saft.steps.deploy import DEPLOY_FILE, DeployConfig, deploy_step

    predictor = PredictorSettings(image=args.image, namespace=args.namespace, cpu=args.cpu, memory=args.memory,
                                  memory_limit=args.memory_limit, gpu_count=args.gpu_count,
                                  gpu_resource=args.gpu_resource, min_replicas=args.min_replicas,
                                  max_replicas=args.max_replicas,
                                  secrets=tuple(args.secret) if args.secret else PredictorSettings().secrets,
                                  service_account=args.service_account, max_batch=args.max_batch,
                                  precision=args.precision)
    rollout = RolloutConfig(canary_percent=args.canary_percent, ready_timeout_s=args.ready_timeout,
                            observe_s=args.observe, poll_s=args.poll, failure_grace_s=args.failure_grace,
                            smoke_test=not args.no_smoke_test)
    cfg = DeployConfig(model_name=args.model_name, version=args.version, service=args.service, predictor=predictor,
                       rollout=rollout, kube_host=args.kube_host, kubeconfig=args.kubeconfig,
                       kube_context=args.kube_context, dry_run=args.dry_run)
    doc = deploy_step(cfg, args.out, log=lambda msg: print(msg, file=sys.stderr))
    print(f"{doc['model_name']} v{doc['version']} -> {doc['service']}: {doc['status']} ({doc['reason']})")
    print(f"wrote {args.out}/{DEPLOY_FILE}")
    return 3 if doc["status"] in (ROLLED_BACK, FAILED) else 0


def register(sub) -> None:
    from saft.serving.kserve import PredictorSettings
    from saft.serving.protocol import Limits

    limits, predictor = Limits(), PredictorSettings()
    sv = sub.add_parser("serve", help="serve a registered model over HTTP (the KServe predictor's command)",
                        description="Loads MODEL_URI (models:/NAME@champion, models:/NAME/3, or a model folder) "
                                    "with its stored base and head, and answers POST /v1/models/NAME:predict "
                                    "with batched top-k predictions; /v2/health/live and /v2/health/ready are the "
                                    "probes. See docs/serving.md.")
    sv.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or a local model folder")
    sv.add_argument("--name", help="model name in the URLs (default: the registered model's name)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 in a pod)")
    sv.add_argument("--port", type=int, default=8080, help="port (default: 8080, KServe's)")
    sv.add_argument("--device", default="auto", help="torch device: auto (CUDA when visible), cpu, cuda, cuda:N")
    sv.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="image tower precision: auto = bf16 autocast on CUDA, fp32 on CPU (default: auto)")
    sv.add_argument("--max-batch", type=int, default=32, help="images per forward pass (default: 32)")
    sv.add_argument("--max-wait-ms", type=float, default=0.0,
                    help="how long a batch waits for images of other requests; 0 takes what queued while the "
                         "previous batch ran (default: 0)")
    sv.add_argument("--decode-workers", type=int, default=0, help="decode threads (default: 0 = min(8, CPUs))")
    sv.add_argument("--threads", type=int, default=0, help="torch threads of the model on the CPU (default: torch's)")
    sv.add_argument("--max-concurrent", type=int, default=64, help="requests processed at once (default: 64)")
    sv.add_argument("--max-body-mb", type=float, default=limits.max_body_bytes / 2**20,
                    help=f"largest request body in MiB (default: {limits.max_body_bytes / 2**20:g})")
    sv.add_argument("--max-instances", type=int, default=limits.max_instances,
                    help=f"images per request (default: {limits.max_instances})")
    sv.add_argument("--max-image-mb", type=float, default=limits.max_image_bytes / 2**20,
                    help=f"largest image (base64-decoded or fetched) in MiB (default: {limits.max_image_bytes / 2**20:g})")
    sv.add_argument("--max-image-pixels", type=int, default=limits.max_image_pixels,
                    help=f"largest image in pixels (default: {limits.max_image_pixels:,})")
    sv.add_argument("--allow-urls", action="store_true", help="fetch {\"url\": ...} instances (off by default)")
    sv.add_argument("--url-allow-host", action="append", default=[], metavar="HOST",
                    help="host URLs may name, repeatable: images.example.com, *.example.com, or * for any public host")
    sv.add_argument("--url-allow-private", action="store_true",
                    help="allow URLs resolving to loopback, link-local and private addresses (refused by default)")
    sv.add_argument("--url-timeout", type=float, default=5.0, help="seconds to fetch one URL (default: 5)")
    sv.set_defaults(func=_serve)

    dp = sub.add_parser("deploy", help="deploy a registered version to KServe with a canary, promote or roll back",
                        description="Renders the InferenceService of MODEL_NAME at --version (default: the champion "
                                    "alias), applies it with --canary-percent of traffic when another version is "
                                    "serving, promotes it to 100%% once ready and answering, else rolls back; "
                                    "records the outcome in the version's saft.deploy.* tags and OUT/deploy.json. "
                                    "Exit status 3 when rolled back or failed.")
    dp.add_argument("--model-name", default="saft-tiny", help="registered model (default: saft-tiny)")
    dp.add_argument("--version", default="champion", help="version number or alias (default: champion)")
    dp.add_argument("--out", required=True, help="output folder for deploy.json and inferenceservice.json")
    dp.add_argument("--service", default="", help="InferenceService name (default: from the model name)")
    dp.add_argument("--namespace", default=predictor.namespace, help=f"namespace (default: {predictor.namespace})")
    dp.add_argument("--image", default=predictor.image, help=f"project image (default: {predictor.image})")
    dp.add_argument("--cpu", default=predictor.cpu, help=f"CPU request (default: {predictor.cpu})")
    dp.add_argument("--memory", default=predictor.memory, help=f"memory request (default: {predictor.memory})")
    dp.add_argument("--memory-limit", default=predictor.memory_limit,
                    help=f"memory limit (default: {predictor.memory_limit})")
    dp.add_argument("--gpu-count", type=int, default=predictor.gpu_count, help="GPUs per replica; 0 serves on CPU")
    dp.add_argument("--gpu-resource", default=predictor.gpu_resource,
                    help=f"GPU resource name (default: {predictor.gpu_resource})")
    dp.add_argument("--min-replicas", type=int, default=predictor.min_replicas, help="minimum replicas (default: 1)")
    dp.add_argument("--max-replicas", type=int, default=predictor.max_replicas, help="maximum replicas (default: 1)")
    dp.add_argument("--secret", action="append", default=[], metavar="NAME",
                    help=f"secret passed as environment, repeatable (default: {', '.join(predictor.secrets)})")
    dp.add_argument("--service-account", default="", help="service account of the predictor pods")
    dp.add_argument("--max-batch", type=int, default=predictor.max_batch, help="images per forward pass")
    dp.add_argument("--precision", default=predictor.precision, choices=["auto", "fp32", "bf16"])
    dp.add_argument("--canary-percent", type=int, default=10, help="traffic to the new version first (default: 10)")
    dp.add_argument("--ready-timeout", type=float, default=900.0, help="seconds for the canary to become ready")
    dp.add_argument("--observe", type=float, default=60.0,
                    help="seconds the ready canary is watched before promotion (default: 60)")
    dp.add_argument("--poll", type=float, default=5.0, help="seconds between status reads (default: 5)")
    dp.add_argument("--failure-grace", type=float, default=60.0,
                    help="seconds a False readiness condition may last before the canary counts as failed (default: 60)")
    dp.add_argument("--no-smoke-test", action="store_true", help="skip the prediction sent to the canary's URL")
    dp.add_argument("--kube-host", default="", help="Kubernetes API URL (default: in-cluster or kube-config); "
                                                   "token from KUBE_TOKEN")
    dp.add_argument("--kubeconfig", default="", help="kube-config file (default: KUBECONFIG or ~/.kube/config)")
    dp.add_argument("--kube-context", default="", help="kube-config context")
    dp.add_argument("--dry-run", action="store_true", help="render and validate the manifest only")
    dp.set_defaults(func=_deploy)
