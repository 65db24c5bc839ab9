"""``saft register``: register a candidate delta in MLflow and apply the promotion gate."""

from __future__ import annotations

import argparse
from saft.io import shorten


def _register(args: argparse.Namespace) -> int:
    from saft.steps.register import REGISTER_FILE, RegisterConfig, register_step

    cfg = RegisterConfig(model_name=args.model_name, method=args.method, promote=args.promote,
                         ood_tolerance=args.ood_tolerance, id_tolerance=args.id_tolerance, gate=args.gate,
                         hm_tolerance=args.hm_tolerance, alpha=args.alpha, register_full=args.register_full,
                         baseline=args.baseline, experiment=args.experiment)
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


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) (0.01 = one point of top-1), got {value:g}")
    return value


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
    p.add_argument("--model-name", default="saft-tiny", help="registered model name (default: saft-tiny)")
    p.add_argument("--method", default="saft",
                   help="model name of the candidate in the metrics document, as given to evaluate --delta "
                        "(default: saft)")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="candidate's delta scale: its aggregate at this alpha is compared and served (default: 1)")
    p.add_argument("--promote", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the promotion gate after registering (default: --promote)")
    p.add_argument("--ood-tolerance", type=_fraction, default=0.01,
                   help="largest allowed drop of OOD mean top-1, as a fraction (default: 0.01 = one point)")
    p.add_argument("--id-tolerance", type=_fraction, default=0.01,
                   help="largest allowed drop of ID top-1, as a fraction (default: 0.01 = one point)")
    p.add_argument("--gate", choices=("auto", "id_ood", "hm"), default="auto",
                   help="what the gate compares: id_ood (ID and OOD mean), hm (base-to-new harmonic mean), or auto: "
                        "hm on a base-to-new suite, id_ood otherwise (default: auto)")
    p.add_argument("--hm-tolerance", type=_fraction, default=0.01,
                   help="largest allowed drop of the base-to-new HM, as a fraction (default: 0.01 = one point)")
    p.add_argument("--register-full", action="store_true",
                   help="register a full fine-tuning (dense) delta too; by default baselines are only logged")
    p.add_argument("--baseline", action="store_true",
                   help="when the model has no champion yet, first register the zero-shot base (an empty delta) "
                        "and promote it, so the candidate is judged against it and a champion always exists")
    p.add_argument("--parent-run-id", default=None,
                   help="MLflow run id of the pipeline run to nest under (default: a standalone run)")
    p.add_argument("--experiment", default="saft", help="MLflow experiment of a standalone run (default: saft)")
    p.set_defaults(func=_register)
