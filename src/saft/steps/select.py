"""The select step: one trained delta per learning rate -> the rate that ships.

Each candidate (a finetune output folder: ``delta.safetensors``, ``history.json``,
``finetune.json``) is merged into the base model in turn and scored on the prepared ID
validation split (``val.jsonl``, drawn apart from the training shots by
``data.val_shots``), with the class prompts of the prepared data; the base alone is
scored too, for reference. The candidate with the highest validation top-1 wins; a tie
goes to the lower learning rate (the smaller move away from the pre-trained weights).
The selection never looks at the evaluation suite, so the suite's numbers stay an
unbiased estimate for the chosen model.

Writes into ``out_dir``: ``selection.json`` (every candidate's rate, validation top-1,
final loss; the choice), ``selection.png`` (validation top-1 against the rate) and the
chosen candidate's files under ``<method>-seed<N>/``, the layout the evaluate step reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from saft.io import atomic_path, write_json
from saft.layout import EVAL, FINETUNE

SELECTION_FILE = EVAL.selection
SELECTION_PLOT = EVAL.selection_plot
SELECTION_SCHEMA = "saft-selection/1"
CANDIDATE_FILES = (FINETUNE.delta, FINETUNE.history, FINETUNE.record)


def _candidate(folder: Path) -> dict:
    missing = [f for f in CANDIDATE_FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"select: {folder} is not a finetune output (missing {', '.join(missing)})")
    record = json.loads((folder / FINETUNE.record).read_text())
    cfg = record["config"]
    return {"folder": str(folder), "method": cfg["method"], "lr": float(cfg["lr"]), "seed": cfg["seed"],
            "final_loss": record.get("final_loss"), "trained_values": record.get("trained_values")}


def _checked(delta, loaded, folder):
    """``delta``, refused unless it was trained on the loaded base."""
    from saft.sparse import FingerprintMismatch

    if delta.base_fingerprint != loaded.fingerprint:
        raise FingerprintMismatch(f"select: {folder}: the delta was trained on another base model "
                                  f"({delta.meta.get('base_model', 'unknown')}) than {loaded.spec}")
    return delta


def choose(candidates: list[dict]) -> dict:
    """Highest ``val_top1``; ties to the lower learning rate."""
    return max(candidates, key=lambda c: (c["val_top1"], -c["lr"]))


def select_step(model_spec: str, data_dir: str | Path, candidate_dirs: list[str | Path], out_dir: str | Path, *,
                root: str | None = None, batch_size: int = 128, device: str = "cpu",
                log: Callable[[str], None] = print) -> dict:
    from saft.eval import delta_top1, top1_accuracy
    from saft.models import load_model
    from saft.sparse import ClassPrompts, load_delta
    from saft.steps.prepared import PreparedData

    if not candidate_dirs:
        raise ValueError("select: no candidates (the learning-rate grid is empty)")
    candidates = [_candidate(Path(d)) for d in candidate_dirs]
    methods = {(c["method"], c["seed"]) for c in candidates}
    if len(methods) != 1:
        raise ValueError(f"select: the candidates mix methods/seeds {sorted(methods)}; select among the learning "
                         "rates of one method and seed")
    data = PreparedData.open(data_dir, root)
    loaded = load_model(model_spec, device=device)
    val = data.dataset(loaded.preprocess, "val")
    prompts = ClassPrompts.build(loaded.tokenizer, data.classes, data.templates)
    zeroshot = top1_accuracy(loaded.model, val, prompts, batch_size=batch_size, device=device)
    log(f"select: {len(val)} ID validation images; zero-shot top-1 {100 * zeroshot:.1f}")
    for c in sorted(candidates, key=lambda c: c["lr"]):
        delta = _checked(load_delta(Path(c["folder"]) / FINETUNE.delta), loaded, c["folder"])
        c["val_top1"] = delta_top1(loaded.model, delta, val, prompts, batch_size=batch_size, device=device)
        log(f"select: {c['method']} lr {c['lr']:g}: validation top-1 {100 * c['val_top1']:.1f}")
    best = choose(candidates)
    out = Path(out_dir)
    chosen_dir = out / f"{best['method']}-seed{best['seed']}"
    chosen_dir.mkdir(parents=True, exist_ok=True)
    for name in CANDIDATE_FILES:
        shutil.copyfile(Path(best["folder"]) / name, chosen_dir / name)
    doc = {"schema": SELECTION_SCHEMA, "metric": "top-1 on the prepared ID validation split (val.jsonl)",
           "model": model_spec, "method": best["method"], "seed": best["seed"], "val_images": len(val),
           "zeroshot_val_top1": zeroshot, "chosen_lr": best["lr"],
           "chosen": {k: v for k, v in best.items() if k != "folder"},
           "candidates": [{k: v for k, v in c.items() if k != "folder"} for c in sorted(candidates, key=lambda c: c["lr"])]}
    _plot(doc, out / SELECTION_PLOT)
    write_json(out / SELECTION_FILE, doc)
    log(f"select: chose lr {best['lr']:g} (validation top-1 {100 * best['val_top1']:.1f})")
    return doc


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["candidates"]
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    ax.plot([r["lr"] for r in rows], [100 * r["val_top1"] for r in rows], "o-", label=doc["method"])
    ax.axhline(100 * doc["zeroshot_val_top1"], color="grey", ls="--", lw=1, label="zero-shot")
    ax.scatter([doc["chosen_lr"]], [100 * doc["chosen"]["val_top1"]], s=120, facecolors="none", edgecolors="red",
               label="chosen", zorder=3)
    if len(rows) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("ID validation top-1 (%)")
    ax.set_title("learning-rate selection")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def selection_table(doc: dict) -> str:
    """The selection as Markdown (for the KFP UI and the CI summary)."""
    lines = [f"Learning rate chosen on {doc['val_images']} ID validation images ({doc['method']}, seed {doc['seed']}; "
             f"zero-shot {100 * doc['zeroshot_val_top1']:.1f}):", "", "| lr | val top-1 | final loss |", "|---|---|---|"]
    for c in doc["candidates"]:
        mark = " (chosen)" if c["lr"] == doc["chosen_lr"] else ""
        loss = "-" if c.get("final_loss") is None else f"{c['final_loss']:.3f}"
        lines.append(f"| {c['lr']:g}{mark} | {100 * c['val_top1']:.1f} | {loss} |")
    return "\n".join(lines)


__all__ = ["SELECTION_FILE", "choose", "select_step", "selection_table"]
