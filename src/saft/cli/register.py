"""``saft register``: register a candidate delta in MLflow and apply the promotion gate."""

from __future__ import annotations

import argparse

from saft.config import add_arguments, from_arguments
from saft.io import shorten
from saft.steps.register import RegisterConfig


def _register(args: argparse.Namespace) -> int:
    from saft.steps.register import REGISTER_FILE, register_step

    cfg = from_arguments(RegisterConfig, args)
    result = register_step(cfg, args.metrics, args.delta, args.out, base_model=args.model, data_dir=args.data,
                           parent_run_id=args.parent_run_id)
    cand, zs = result["candidate"], result["zeroshot"]
    scores = lambda s: ", ".join(f"{label} {100 * s[k]:.2f}" for k, label in  # noqa: E731
                                 (("id", "ID"), ("ood_mean", "OOD mean"), ("hm", "HM")) if s.get(k) is not None)
    print(f"candidate {cfg.method} @ alpha {cfg.alpha:g} on {cand['suite']}: {scores(cand)} "
          f"(zero-shot {scores(zs)})")
    if result.get("baseline"):
        b = result["baseline"]
        print(f"{cfg.model_name} v{b['version']}: zero-shot baseline, {b['verdict']} ({shorten(b['reason'], 200)})")
    if result.get("version"):
        state = "new version" if result["created"] else "existing version (same candidate key)"
        print(f"{cfg.model_name} v{result['version']}: {state}")
    print(f"verdict: {result['verdict']} - {result['reason']}")
    aliases = {k: v for k, v in (result.get("aliases") or {}).items() if v}
    if aliases:
        print("aliases: " + ", ".join(f"{k} -> v{v}" for k, v in aliases.items()))
    print(f"wrote {args.out}/{REGISTER_FILE}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "register", help="register a delta in the MLflow registry and apply the promotion gate",
        description="Logs the delta with its base reference as an MLflow pyfunc model (in a nested `register` run "
                    "when --parent-run-id is given), registers it once per candidate, and moves the `champion` "
                    "alias only when the gate passes: OOD mean and ID may not drop by more than the tolerances "
                    "against zero-shot and against the current champion. Writes OUT/register.json. Tracking goes "
                    "to MLFLOW_TRACKING_URI (default: ./mlruns/mlflow.db); SAFT_TRACKING=off skips registration.")
    p.add_argument("--metrics", required=True, help="metrics.json written by `saft evaluate` for this delta")
    p.add_argument("--delta", required=True, help="delta.safetensors written by `saft finetune`")
    p.add_argument("--data", required=True,
                   help="prepared data folder whose class names and templates the served model uses")
    p.add_argument("--model", required=True, help="base model spec the delta was trained on (e.g. tiny, ViT-B-16@openai)")
    p.add_argument("--out", required=True, help="output folder for register.json (created if missing)")
    add_arguments(p, RegisterConfig)
    p.add_argument("--parent-run-id", default=None,
                   help="MLflow run id of the pipeline run to nest under (default: a standalone run)")
    p.set_defaults(func=_register)
