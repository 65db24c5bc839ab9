"""WiSE-FT: full fine-tuning's delta at the mixing weight chosen on the ID validation split.

WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models", CVPR 2022)
ensembles the weights of the zero-shot and the fine-tuned model,
``theta(alpha) = (1 - alpha) * theta_zs + alpha * theta_ft``, which here is
``base + alpha * delta`` of method ``full``: no training of its own. The paper shows the
whole curve and reports a fixed alpha = 0.5 as well as the alpha chosen on held-out ID
data; this step does the latter. Every alpha of the grid is scored on the prepared ID
validation split (``val.jsonl``, the split the learning rates are chosen on; the suite is
never looked at); the best wins, a tie going to the smaller alpha (closer to zero-shot).

Writes ``wiseft.json`` (the curve of validation top-1 against alpha, and the choice) and
``wiseft.png`` into ``wiseft/`` beside the full fine-tuning delta it reads; the evaluation
then applies that delta at that alpha (``DeltaRun(..., alpha=...)``,
``--delta wiseft:SEED@ALPHA=PATH``): WiSE-FT stores no weights of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from saft.io import atomic_path, write_json
from saft.layout import FINETUNE, WISEFT_OUT
from saft.steps.configs import WiseftConfig, check_alphas
from saft.steps.record import run_once

WISEFT_DIR = FINETUNE.wiseft  # beside the delta: its own folder, its own step record
WISEFT_SCHEMA = "saft-wiseft/1"
def choose_alpha(curve: list[dict]) -> dict:
    """Highest ``val_top1``; ties to the smaller alpha."""
    return max(curve, key=lambda c: (c["val_top1"], -c["alpha"]))


def wiseft_step(cfg: WiseftConfig, data_dir: str | Path, delta_path: str | Path, out_dir: str | Path, *,
                root: str | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Choose WiSE-FT's alpha for the full fine-tuning delta ``delta_path`` (``cfg.device`` resolved: not auto);
    returns the ``wiseft.json`` document."""
    model_spec, batch_size, device = cfg.model, cfg.batch_size, cfg.device
    alphas = check_alphas(cfg.alphas)
    params = {"model": model_spec, "alphas": alphas, "root": root, "batch_size": batch_size, "device": device}
    run_once("wiseft", out_dir, params, [Path(data_dir), Path(delta_path)], [WISEFT_OUT.record, WISEFT_OUT.plot],
             lambda: _choose(model_spec, data_dir, delta_path, out_dir, alphas, root, batch_size, device,
                             log or (lambda _: None)), log=log)
    return json.loads((Path(out_dir) / WISEFT_OUT.record).read_text())


def _choose(model_spec, data_dir, delta_path, out_dir, alphas, root, batch_size, device, log) -> dict:
    from saft.eval import delta_top1
    from saft.models import load_model
    from saft.sparse import ClassPrompts, FingerprintMismatch, load_delta
    from saft.steps.prepared import PreparedData

    data = PreparedData.open(data_dir, root)
    loaded = load_model(model_spec, device=device)
    delta = load_delta(delta_path)
    if delta.base_fingerprint != loaded.fingerprint:
        raise FingerprintMismatch(f"{delta_path}: the delta was trained on another base model than {model_spec}")
    method = delta.meta.get("method", "")
    if method != "full":
        raise ValueError(f"{delta_path}: WiSE-FT interpolates full fine-tuning's delta, this one is {method!r}")
    val = data.dataset(loaded.preprocess, "val")
    prompts = ClassPrompts.build(loaded.tokenizer, data.classes, data.templates)
    curve = []
    for alpha in alphas:
        top1 = delta_top1(loaded.model, delta, val, prompts, alpha=alpha, batch_size=batch_size, device=device)
        curve.append({"alpha": alpha, "val_top1": top1})
        log(f"wiseft: alpha {alpha:g}: validation top-1 {100 * top1:.1f}")
    best = choose_alpha(curve)
    config = json.loads(delta.meta.get("config", "{}"))
    doc = {"schema": WISEFT_SCHEMA, "metric": "top-1 on the prepared ID validation split (val.jsonl)",
           "definition": "base + alpha * (full fine-tuning's delta), alpha chosen on ID validation "
                         "(Wortsman et al. 2022); ties to the smaller alpha",
           "model": model_spec, "seed": config.get("seed"), "lr": config.get("lr"), "val_images": len(val),
           "delta": Path(delta_path).name, "chosen_alpha": best["alpha"], "chosen_val_top1": best["val_top1"],
           "curve": curve}
    out = Path(out_dir)
    _plot(doc, out / WISEFT_OUT.plot)
    write_json(out / WISEFT_OUT.record, doc)
    log(f"wiseft: chose alpha {best['alpha']:g} (validation top-1 {100 * best['val_top1']:.1f})")
    return {"chosen_alpha": best["alpha"]}


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = doc["curve"]
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    ax.plot([c["alpha"] for c in curve], [100 * c["val_top1"] for c in curve], "o-", color="tab:red",
            label="base + alpha * delta (full)")
    ax.scatter([doc["chosen_alpha"]], [100 * doc["chosen_val_top1"]], s=120, facecolors="none", edgecolors="black",
               label=f"chosen: alpha {doc['chosen_alpha']:g}", zorder=3)
    ax.set_xlabel("alpha (0: zero-shot, 1: full fine-tuning)")
    ax.set_ylabel("ID validation top-1 (%)")
    ax.set_title(f"WiSE-FT: alpha chosen on validation (seed {doc['seed']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def read_wiseft(folder: str | Path) -> dict | None:
    """The WiSE-FT choice made for the full fine-tuning delta in ``folder``, None when there is none."""
    path = Path(folder) / WISEFT_DIR / WISEFT_OUT.record
    return json.loads(path.read_text()) if path.is_file() else None


__all__ = ["WISEFT_DIR", "choose_alpha", "read_wiseft", "wiseft_step"]
