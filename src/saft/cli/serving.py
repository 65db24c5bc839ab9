"""``saft serve`` (the HTTP endpoint of a registered model) and ``saft deploy`` (KServe rollout)."""

from __future__ import annotations

import argparse
import os
import sys

from saft.config import add_arguments, from_arguments


def _serve(args: argparse.Namespace) -> int:
    import logging
    import os

    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. With the decode
    # threads beside the model's, spinning teams starved them (measured with `saft bench serve`
    # on 2 cores: several times fewer requests per second).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from saft.serving.fetch import FetchPolicy
    from saft.serving.predictor import serving_device, usable_autocast
    from saft.serving.protocol import MiB, Limits
    from saft.serving.server import ServeConfig, serve
    from saft.tracking.registry import check_model_uri

    check_model_uri(args.model_uri)  # a name the store does not have fails here, naming the store
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import torch

        # refused now, with the reason, rather than served elsewhere or found out after the model loaded
        usable_autocast(torch.device(serving_device(args.device)), args.precision)
        limits = Limits(max_body_bytes=int(args.max_body_mb * MiB), max_instances=args.max_instances,
                        max_image_bytes=int(args.max_image_mb * MiB), max_image_pixels=args.max_image_pixels,
                        max_request_pixels=args.max_request_pixels)
        policy = FetchPolicy(enabled=args.allow_urls, allow_hosts=tuple(args.url_allow_host),
                             allow_private=args.url_allow_private, max_bytes=int(args.max_image_mb * MiB),
                             timeout_s=args.url_timeout)
        cfg = ServeConfig(model_uri=args.model_uri, name=args.name, host=args.host, port=args.port,
                          device=args.device, precision=args.precision, max_batch=args.max_batch,
                          max_wait_ms=args.max_wait_ms, decode_workers=args.decode_workers,
                          decode_memory_mb=args.decode_memory_mb, max_concurrent=args.max_concurrent,
                          max_queue=args.max_queue, max_buffered_mb=args.max_buffered_mb,
                          body_timeout_s=args.body_timeout, saturation_s=args.saturation, limits=limits,
                          policy=policy, threads=args.threads)
    except ValueError as exc:
        print(f"saft serve: {exc}", file=sys.stderr)
        return 2
    return serve(cfg)


def _deploy(args: argparse.Namespace) -> int:
    from saft.serving.kserve import PredictorSettings
    from saft.serving.rollout import FAILED, ROLLED_BACK, RolloutConfig
    from saft.steps.deploy import DEPLOY_FILE, DeployConfig, deploy_step

    cfg = DeployConfig(model_name=args.model_name, version=args.version, service=args.service,
                       predictor=from_arguments(PredictorSettings, args), rollout=from_arguments(RolloutConfig, args),
                       kube_host=args.kube_host, kubeconfig=args.kubeconfig, kube_context=args.kube_context,
                       dry_run=args.dry_run)
    doc = deploy_step(cfg, args.out, log=lambda msg: print(msg, file=sys.stderr))
    print(f"{doc['model_name']} v{doc['version']} -> {doc['service']}: {doc['status']} ({doc['reason']})")
    print(f"wrote {args.out}/{DEPLOY_FILE}")
    return 3 if doc["status"] in (ROLLED_BACK, FAILED) else 0


def register(sub) -> None:
    from saft.serving.kserve import PredictorSettings
    from saft.serving.protocol import Limits
    from saft.serving.rollout import RolloutConfig

    limits = Limits()
    sv = sub.add_parser("serve", help="serve a registered model over HTTP (the KServe predictor's command)",
                        description="Loads MODEL_URI (models:/NAME@champion, models:/NAME/3, or a model folder) "
                                    "with its stored base and head, and serves KServe's V2 Open Inference Protocol "
                                    "(POST /v2/models/NAME/infer, metadata, /v2/health/live and /v2/health/ready) "
                                    "and V1 (POST /v1/models/NAME:predict), with Prometheus metrics at /metrics. "
                                    "See docs/serving.md.")
    sv.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or a local model folder")
    sv.add_argument("--name", help="model name in the URLs (default: the InferenceService name KServe gives the "
                                   "registered model, e.g. saft_ViT.B -> saft-vit-b; saft for a folder)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 in a pod)")
    sv.add_argument("--port", type=int, default=8080, help="port (default: 8080, KServe's)")
    sv.add_argument("--device", default=os.environ.get("SAFT_SERVE_DEVICE") or "auto",
                    help="torch device: auto (CUDA when visible), cpu, cuda, cuda:N; one this machine lacks is "
                         "refused (default: SAFT_SERVE_DEVICE, else auto)")
    sv.add_argument("--precision", default=os.environ.get("SAFT_SERVE_PRECISION") or "auto",
                    choices=["auto", "fp32", "bf16"],
                    help="image tower precision: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 on a GPU without "
                         "bfloat16 is refused (default: SAFT_SERVE_PRECISION, else auto)")
    sv.add_argument("--max-batch", type=int, default=32, help="images per forward pass (default: 32)")
    sv.add_argument("--max-wait-ms", type=float, default=0.0,
                    help="how long a batch waits for images of other requests; 0 takes what queued while the "
                         "previous batch ran (default: 0)")
    sv.add_argument("--decode-workers", type=int, default=0, help="decode threads (default: 0 = min(8, CPUs))")
    sv.add_argument("--decode-memory-mb", type=float, default=0.0,
                    help="memory the images being decoded may take together, estimated from their headers; an "
                         "image that needs more is refused with 413 (default: 0 = a quarter of the container's "
                         "memory limit)")
    sv.add_argument("--threads", type=int, default=0, help="torch threads of the model on the CPU (default: torch's)")
    sv.add_argument("--max-concurrent", type=int, default=64,
                    help="requests parsed, decoded and classified at once (default: 64)")
    sv.add_argument("--max-queue", type=int, default=256,
                    help="requests waiting for a slot; one more is refused with 503 and Retry-After (default: 256)")
    sv.add_argument("--body-timeout", type=float, default=30.0,
                    help="seconds a client has to send its whole request body, else 408 (default: 30)")
    sv.add_argument("--max-buffered-mb", type=float, default=0.0,
                    help="request bodies held in memory at once; beyond it 503 (default: 0 = 4 x --max-body-mb)")
    sv.add_argument("--saturation", type=float, default=5.0,
                    help="readiness answers 503 while a queued request has waited this many seconds, and for as "
                         "long after a request was refused as busy (default: 5)")
    sv.add_argument("--max-body-mb", type=float, default=limits.max_body_bytes / 2**20,
                    help=f"largest request body in MiB (default: {limits.max_body_bytes / 2**20:g})")
    sv.add_argument("--max-instances", type=int, default=limits.max_instances,
                    help=f"images per request (default: {limits.max_instances})")
    sv.add_argument("--max-image-mb", type=float, default=limits.max_image_bytes / 2**20,
                    help=f"largest image (base64-decoded or fetched) in MiB (default: {limits.max_image_bytes / 2**20:g})")
    sv.add_argument("--max-image-pixels", type=int, default=limits.max_image_pixels,
                    help=f"largest image in pixels, from its header (default: {limits.max_image_pixels:,})")
    sv.add_argument("--max-request-pixels", type=int, default=limits.max_request_pixels,
                    help=f"pixels of all images of one request together (default: {limits.max_request_pixels:,})")
    sv.add_argument("--allow-urls", action="store_true", help="fetch {\"url\": ...} instances (off by default)")
    sv.add_argument("--url-allow-host", action="append", default=[], metavar="HOST",
                    help="host URLs may name, repeatable: images.example.com, *.example.com, or * for any public host")
    sv.add_argument("--url-allow-private", action="store_true",
                    help="allow URLs resolving to loopback, link-local and private addresses (refused by default)")
    sv.add_argument("--url-timeout", type=float, default=5.0, help="seconds to fetch one URL (default: 5)")
    sv.set_defaults(func=_serve)

    dp = sub.add_parser("deploy", help="deploy a registered version to KServe with a canary, promote or roll back",
                        description="Renders the InferenceService of MODEL_NAME at --version (default: the champion "
                                    "alias), served under the service's name, applies it with --canary-percent of "
                                    "traffic when another version is serving (KServe's Knative mode), promotes it "
                                    "to 100% once ready and answering, else rolls back; records the outcome in the "
                                    "version's saft.deploy.* tags and OUT/deploy.json. Every write uses the API "
                                    "server's strict field validation. Exit status 3 when rolled back or failed. "
                                    "Needs KServe >= 0.16 (its mode names). See docs/serving.md.")
    dp.add_argument("--model-name", default="saft-tiny", help="registered model (default: saft-tiny)")
    dp.add_argument("--version", default="champion", help="version number or alias (default: champion)")
    dp.add_argument("--out", required=True, help="output folder for deploy.json and inferenceservice.json")
    dp.add_argument("--service", default="", help="InferenceService name (default: from the model name)")
    add_arguments(dp, PredictorSettings)
    add_arguments(dp, RolloutConfig)
    dp.add_argument("--kube-host", default="", help="Kubernetes API URL (default: in-cluster or kube-config); "
                                                   "token from KUBE_TOKEN")
    dp.add_argument("--kubeconfig", default="", help="kube-config file (default: KUBECONFIG or ~/.kube/config)")
    dp.add_argument("--kube-context", default="", help="kube-config context")
    dp.add_argument("--dry-run", action="store_true",
                    help="apply nothing: the first write is sent as a server-side dry run (dryRun=All: schema and "
                         "KServe's admission webhook) when a cluster is reachable, else the manifest is only "
                         "rendered; deploy.json says which (validated: api-server | none)")
    dp.set_defaults(func=_deploy)
