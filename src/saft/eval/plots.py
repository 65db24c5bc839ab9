"""The report's figures (matplotlib, Agg), as PNG bytes by file name.

Every legend sits outside its axes, to the right, so it never hides a bar or a point.
Error bars are drawn only where a spread exists (two or more seeds); a single seed gets
the bare point or bar, never a bar of zero length that reads as "no variance".
"""

from __future__ import annotations

import io
import re

MODEL_ORDER = ("zeroshot", "full", "wiseft", "lpft", "lora", "saft", "random")
COLOURS = {"zeroshot": "tab:gray", "full": "tab:red", "wiseft": "tab:brown", "lpft": "tab:purple", "lora": "tab:green",
           "saft": "tab:blue", "random": "tab:orange"}
MARKERS = {"wiseft": "*"}  # a point of full fine-tuning's curve: drawn apart from the curves' dots
_OTHER = ("tab:pink", "tab:olive", "tab:cyan", "gold", "navy", "teal")


def model_key(name: str) -> tuple[int, str]:
    return (MODEL_ORDER.index(name) if name in MODEL_ORDER else len(MODEL_ORDER), name)


def colour(name: str, others: list[str]) -> str:
    if name in COLOURS:
        return COLOURS[name]
    if name not in others:
        others.append(name)
    return _OTHER[others.index(name) % len(_OTHER)]


def natural_key(text: str) -> list:
    """``resblocks.2`` before ``resblocks.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def main_aggregates(doc: dict) -> list[dict]:
    """One aggregate per model: alpha 1.0 (or None) when several alphas exist."""
    best: dict[str, dict] = {}
    for agg in doc["aggregates"]:
        cur = best.get(agg["model"])
        rank = 0 if agg["alpha"] in (None, 1.0) else 1
        if cur is None or rank < (0 if cur["alpha"] in (None, 1.0) else 1):
            best[agg["model"]] = agg
    return [best[m] for m in sorted(best, key=model_key)]


def _pct(stat: dict | None) -> tuple[float, float | None]:
    if not stat:
        return float("nan"), None
    return 100 * stat["mean"], None if stat.get("std") is None else 100 * stat["std"]


def png_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, grid: str = "both") -> bytes:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if grid:
        ax.grid(alpha=0.3, axis=grid)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    return png_bytes(fig)


def _grouped_bars(ax, groups: list[str], series: list[tuple[str, str, list[float], list[float | None]]]) -> None:
    """Bars per group, one per series (label, colour, values, stds); stds drawn only where known."""
    width = 0.8 / max(len(series), 1)
    for i, (label, col, values, stds) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, values, width, label=label, color=col)
        known = [(x, v, s) for x, v, s in zip(xs, values, stds) if s is not None]
        if known:
            ax.errorbar([k[0] for k in known], [k[1] for k in known], yerr=[k[2] for k in known], fmt="none",
                        ecolor="black", capsize=2, linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 3 else 0,
                  ha="right" if len(groups) > 3 else "center")


def _with_base(doc: dict, pts: list[dict]) -> list[dict]:
    """An alpha curve with the zero-shot point as its alpha-0 end: base + 0 * delta is the base."""
    zs = next((a for a in doc["aggregates"] if a["model"] == "zeroshot" and "id" in a and "ood_mean" in a), None)
    if zs is None or len(pts) < 2 or any(a["alpha"] == 0 for a in pts):
        return pts
    return [{**zs, "alpha": 0.0}] + pts


def _id_vs_ood(plt, doc: dict, others: list[str]) -> bytes | None:
    id_ood = [a for a in doc["aggregates"] if "id" in a and "ood_mean" in a]
    if not id_ood:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for model in sorted({a["model"] for a in id_ood}, key=model_key):
        pts = sorted((a for a in id_ood if a["model"] == model), key=lambda a: -1 if a["alpha"] is None else a["alpha"])
        col = colour(model, others)
        main = next((a for a in pts if a["alpha"] in (None, 1.0)), pts[-1])
        pts = _with_base(doc, pts)
        alphas = ", ".join("1" if a["alpha"] is None else f"{a['alpha']:g}" for a in pts)
        label = model if len(pts) == 1 else f"{model} (alpha {alphas})"
        marker = MARKERS.get(model, "o")
        ax.plot([_pct(a["id"])[0] for a in pts], [_pct(a["ood_mean"])[0] for a in pts],
                f"-{marker}" if len(pts) > 1 else marker, color=col, markersize=11 if marker == "*" else 5,
                label=label)
        (x, xs), (y, ys) = _pct(main["id"]), _pct(main["ood_mean"])
        if xs is not None or ys is not None:
            ax.errorbar(x, y, xerr=xs, yerr=ys, color=col, capsize=3, fmt="none")
    return _finish(fig, ax, "ID top-1 (%)", "OOD mean top-1 (%)", "In-distribution vs out-of-distribution")


def _per_dataset(plt, doc: dict, others: list[str]) -> bytes | None:
    aggs = main_aggregates(doc)
    datasets = sorted({d for a in aggs for d in a["per_dataset"]},
                      key=lambda d: (aggs[0]["per_dataset"].get(d, {}).get("role") != "id", d))
    if not datasets:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(datasets) + 2.5), 3.8))
    series = []
    for a in aggs:
        cells = [_pct(a["per_dataset"].get(d)) for d in datasets]
        series.append((a["model"], colour(a["model"], others), [c[0] for c in cells], [c[1] for c in cells]))
    _grouped_bars(ax, datasets, series)
    return _finish(fig, ax, "", "top-1 (%)", "Per-dataset accuracy", grid="y")


def _alpha_curve(plt, doc: dict, others: list[str]) -> bytes | None:
    id_ood = [a for a in doc["aggregates"] if "id" in a and "ood_mean" in a and a["alpha"] is not None]
    curves = {m: sorted((a for a in id_ood if a["model"] == m), key=lambda a: a["alpha"]) for m in {a["model"] for a in id_ood}}
    curves = {m: c for m, c in curves.items() if len(c) > 1}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for model, pts in sorted(curves.items(), key=lambda kv: model_key(kv[0])):
        pts = _with_base(doc, pts)
        alphas, col = [a["alpha"] for a in pts], colour(model, others)
        ax.plot(alphas, [_pct(a["id"])[0] for a in pts], "-o", markersize=4, color=col, label=f"{model} ID")
        ax.plot(alphas, [_pct(a["ood_mean"])[0] for a in pts], "--s", markersize=4, color=col, label=f"{model} OOD")
    return _finish(fig, ax, "alpha (base + alpha * delta)", "top-1 (%)", "Interpolating the delta")


def _wiseft_alpha(plt, context: dict, others: list[str]) -> bytes | None:
    runs = sorted((r for r in context.get("runs", []) if r.get("wiseft")), key=lambda r: r.get("seed") or 0)
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    col = colour("wiseft", others)
    for i, run in enumerate(runs):
        curve, chosen = run["wiseft"]["curve"], run["wiseft"]["chosen_alpha"]
        ax.plot([c["alpha"] for c in curve], [100 * c["val_top1"] for c in curve], "-", color=col, alpha=0.7,
                linewidth=1.2, label="ID validation top-1 (one line per seed)" if i == 0 else None)
        best = next(c for c in curve if c["alpha"] == chosen)
        ax.plot([chosen], [100 * best["val_top1"]], "*", color="black", markersize=10,
                label="chosen alpha" if i == 0 else None)
    return _finish(fig, ax, "alpha (0: zero-shot, 1: full fine-tuning)", "ID validation top-1 (%)",
                   "WiSE-FT: alpha chosen on ID validation")


def _bars_with_average(plt, aggs: list[dict], values, ylabel: str, title: str, others: list[str]) -> bytes:
    """Grouped bars per category and an ``average`` group; ``values(agg)`` -> (category -> stat, average stat)."""
    per = {a["model"]: values(a) for a in aggs}
    groups = sorted({g for cells, _ in per.values() for g in cells}) + ["average"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) + 2.5), 3.8))
    series = []
    for a in aggs:
        cells, average = per[a["model"]]
        stats = [_pct(cells.get(g)) for g in groups[:-1]] + [_pct(average)]
        series.append((a["model"], colour(a["model"], others), [c[0] for c in stats], [c[1] for c in stats]))
    _grouped_bars(ax, groups, series)
    ax.axhline(0, color="black", linewidth=0.8)
    return _finish(fig, ax, "", ylabel, title, grid="y")


def _base_to_new(plt, doc: dict, others: list[str]) -> bytes | None:
    aggs = [a for a in main_aggregates(doc) if "base_to_new" in a]
    if not aggs:
        return None
    return _bars_with_average(plt, aggs, lambda a: ({g: v["hm"] for g, v in a["base_to_new"].items()}, a["hm"]),
                              "HM of base and new top-1 (%)", "Base-to-new: harmonic mean", others)


def _effective_robustness(plt, doc: dict, others: list[str]) -> bytes | None:
    aggs = [a for a in main_aggregates(doc) if "effective_robustness_per_shift" in a]
    if not aggs:
        return None
    return _bars_with_average(plt, aggs, lambda a: (a["effective_robustness_per_shift"], a["effective_robustness"]),
                              "effective robustness (points)", "OOD top-1 above the reference fit", others)


def _mask_landing(plt, context: dict, others: list[str]) -> bytes | None:
    by_method: dict[str, list[dict]] = {}
    for run in context.get("runs", []):
        if run.get("per_block"):
            by_method.setdefault(run["method"], []).append(run["per_block"])
    if not by_method:
        return None
    blocks = sorted({b for runs in by_method.values() for pb in runs for b in pb}, key=natural_key)
    fig, ax = plt.subplots(figsize=(7.0, max(2.5, 0.25 * len(blocks) * max(1, len(by_method)) ** 0.5 + 1)))
    height = 0.8 / len(by_method)
    for i, (method, runs) in enumerate(sorted(by_method.items(), key=lambda kv: model_key(kv[0]))):
        counts = [sum(pb.get(b, 0) for pb in runs) / len(runs) for b in blocks]
        ys = [j + (i - (len(by_method) - 1) / 2) * height for j in range(len(blocks))]
        total = sum(counts)
        ax.barh(ys, counts, height, color=colour(method, others), label=f"{method} ({total:,.0f} entries)")
    ax.set_yticks(range(len(blocks)), blocks, fontsize=7)
    ax.invert_yaxis()
    return _finish(fig, ax, "trained entries (mean over seeds)", "", "Where the mask landed, per block", grid="x")


def _training_curves(plt, context: dict, others: list[str]) -> bytes | None:
    runs = [r for r in context.get("runs", []) if r.get("history")]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    labelled: set[str] = set()
    for run in sorted(runs, key=lambda r: (model_key(r["method"]), r.get("seed") or 0)):
        method = run["method"]
        ax.plot([h["step"] for h in run["history"]], [h["loss"] for h in run["history"]], color=colour(method, others),
                linewidth=1.2, alpha=0.8, label=None if method in labelled else method)
        labelled.add(method)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax, "optimizer step", "training loss", "Training curves (one line per seed)")


def plot_figures(doc: dict, context: dict | None = None) -> dict[str, bytes]:
    """PNG bytes of each plot the document (and run context) supports, by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    context = context or {}
    others: list[str] = []
    makers = {"id_vs_ood.png": lambda: _id_vs_ood(plt, doc, others),
              "per_dataset.png": lambda: _per_dataset(plt, doc, others),
              "base_to_new.png": lambda: _base_to_new(plt, doc, others),
              "effective_robustness.png": lambda: _effective_robustness(plt, doc, others),
              "alpha_curve.png": lambda: _alpha_curve(plt, doc, others),
              "wiseft_alpha.png": lambda: _wiseft_alpha(plt, context, others),
              "mask_landing.png": lambda: _mask_landing(plt, context, others),
              "training_curves.png": lambda: _training_curves(plt, context, others)}
    figures = {}
    for name, make in makers.items():
        png = make()
        if png is not None:
            figures[name] = png
    return figures
