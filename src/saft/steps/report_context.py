"""What a report says about the runs behind its numbers, read from the runs' own files.

For every evaluated delta: method, seed, learning rate and steps (from the delta's
metadata, which the trainer writes), trainable values and file size, the data version
(training manifest hash), where its entries landed (values per block, for sparse
deltas), the training curve (``history.json`` beside the delta) and the mask density
(``mask_stats.json`` beside the mask that ``finetune.json`` names). Files that are not
there (a delta copied alone) leave their fields out; nothing is guessed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

from saft.sparse.delta import _HEAD, _IDX, _LORA_A, _LORA_B, _VAL, DELTA_FORMATS
from saft.sparse.mask import block_of
from saft.layout import FINETUNE, MASK, PREPARED

HISTORY_FILE = FINETUNE.history
FINETUNE_FILE = FINETUNE.record
MASK_STATS_FILE = MASK.stats
_CURVE_POINTS = 200  # a curve of 100k steps is thinned to this many points for the page


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _thin(history: list[dict]) -> list[dict]:
    rows = [{"step": h["step"], "loss": h["loss"]} for h in history
            if isinstance(h.get("loss"), (int, float)) and "step" in h]
    stride = max(1, len(rows) // _CURVE_POINTS)
    return rows[::stride] + ([rows[-1]] if rows and (len(rows) - 1) % stride else [])


def delta_header(path: Path) -> tuple[dict[str, int], set[str], dict[str, str]]:
    """(values per tensor, tensors stored sparse, metadata) from the file header only.

    A full fine-tuning delta of ViT-L/14 is 1.7 GB; the report needs its counts, not its
    values, so no tensor is read. A low-rank entry counts its two factors; a trained
    head's offsets count under ``head``.
    """
    from safetensors import SafetensorError, safe_open

    counts: dict[str, int] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            for k in keys:
                for suffix, name in ((_VAL, k[: -len(_VAL)]), (_LORA_A, k[: -len(_LORA_A)]),
                                     (_LORA_B, k[: -len(_LORA_B)]), (_HEAD, "head")):
                    if k.endswith(suffix):
                        counts[name] = counts.get(name, 0) + math.prod(f.get_slice(k).get_shape())
                        break
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    if meta.get("format") not in DELTA_FORMATS:
        raise ValueError(f"{path}: not a SAFT delta (format={meta.get('format')!r}, expected one of "
                         f"{', '.join(DELTA_FORMATS)})")
    return counts, {k[: -len(_IDX)] for k in keys if k.endswith(_IDX)}, meta


def delta_kind(counts: dict[str, int], sparse: set[str], meta: dict[str, str]) -> str:
    """How a delta stores its update: sparse, low-rank or dense (plus a trained head)."""
    head = " + class head" if "head" in counts else ""
    weights = set(counts) - {"head"}
    if weights and weights <= sparse:
        return "sparse" + head
    if "lora_rank" in meta:
        return f"low-rank (rank {meta['lora_rank']})" + head
    return ("dense" if weights else "none") + head


def run_summary(name: str, seed: int | None, path: str | Path, alpha: float | None = None) -> dict:
    """One evaluated delta as the report shows it (``alpha``: the run is that delta at one fixed weight, WiSE-FT's
    point of full fine-tuning; its training curve is the delta's own run's)."""
    path = Path(path)
    counts, sparse, meta = delta_header(path)
    run: dict = {"method": name, "seed": seed, "trainable": sum(counts.values()), "delta_bytes": path.stat().st_size,
                 "sparse": set(counts) <= sparse, "kind": delta_kind(counts, sparse, meta)}
    if alpha is not None:
        from saft.steps.wiseft import read_wiseft

        run["alpha"] = alpha
        chosen = read_wiseft(path.parent)
        if chosen is not None:
            run["wiseft"] = {"curve": chosen["curve"], "chosen_alpha": chosen["chosen_alpha"]}
    for key, cast in (("lr", float), ("steps", int)):
        if key in meta:
            run[key] = cast(meta[key])
    for key in ("manifest_hash", "base_model"):
        if key in meta:
            run[key] = meta[key]
    if "method" in meta:
        run["delta_method"] = meta["method"]
    if run["sparse"]:
        per_block: dict[str, int] = {}
        for tensor, n in counts.items():
            per_block[block_of(tensor)] = per_block.get(block_of(tensor), 0) + int(n)
        run["per_block"] = per_block
    history = _read_json(path.parent / HISTORY_FILE) if alpha is None else None
    if isinstance(history, list):
        run["history"] = _thin(history)
    record = _read_json(path.parent / FINETUNE_FILE) or {}
    if record.get("mask"):
        stats = _read_json(Path(record["mask"]).parent / MASK_STATS_FILE) or {}
        if "density" in stats:
            run["density"] = stats["density"]
    if record.get("data"):
        prepared = _read_json(Path(record["data"]) / PREPARED.record) or {}
        run["data"] = {k: prepared[k] for k in ("dataset", "root", "split", "shots", "subset") if k in prepared}
    return run


def report_context(deltas: Iterable, settings: dict | None = None) -> dict:
    """``{"settings": ..., "runs": [...]}`` for :func:`saft.eval.report.write_report`."""
    return {"settings": dict(settings or {}),
            "runs": [run_summary(d.name, d.seed, d.path, getattr(d, "alpha", None)) for d in deltas]}
