"""Reports from a metrics document: Markdown plus a self-contained HTML page with plots.

Plots (matplotlib, embedded in the HTML as PNG data URIs so the page opens anywhere):
ID vs OOD accuracy per model (error bars over seeds; models evaluated at several
``alpha`` values are drawn as a curve from the base), per-dataset bars, and ID/OOD
accuracy against ``alpha`` for base + alpha * delta.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from saft.io import atomic_path

_MODEL_ORDER = ("zeroshot", "full", "saft", "random")


def _model_key(name: str) -> tuple[int, str]:
    return (_MODEL_ORDER.index(name) if name in _MODEL_ORDER else len(_MODEL_ORDER), name)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _main_aggregates(doc: dict) -> list[dict]:
    """One aggregate per model: alpha 1.0 (or None) when several alphas exist."""
    best: dict[str, dict] = {}
    for agg in doc["aggregates"]:
        cur = best.get(agg["model"])
        rank = 0 if agg["alpha"] in (None, 1.0) else 1
        if cur is None or rank < (0 if cur["alpha"] in (None, 1.0) else 1):
            best[agg["model"]] = agg
    return [best[m] for m in sorted(best, key=_model_key)]


def markdown_report(doc: dict, title: str = "Evaluation report") -> str:
    aggs = _main_aggregates(doc)
    datasets = sorted({d for a in aggs for d in a["per_dataset"]},
                      key=lambda d: (aggs[0]["per_dataset"].get(d, {}).get("role", "z") != "id", d))
    lines = [f"# {title}", ""]
    if doc.get("meta"):
        lines += [f"- {k}: {v}" for k, v in sorted(doc["meta"].items())] + [""]
    head = ["model"] + [f"{d} ({a['per_dataset'][d]['role']})" if d in (a := aggs[0])["per_dataset"] else d
                        for d in datasets]
    has_id_ood = any("id" in a and "ood_mean" in a for a in aggs)
    has_b2n = any("hm" in a for a in aggs)
    if has_id_ood:
        head += ["ID", "OOD mean", "OOD gain", "eff. robustness"]
    if has_b2n:
        head += ["base", "new", "HM"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in aggs:
        row = [a["model"]]
        for d in datasets:
            cell = a["per_dataset"].get(d)
            row.append("-" if cell is None else f"{_pct(cell['mean'])} ± {_pct(cell['std'])}")
        if has_id_ood:
            row += [_pct(a.get("id", {}).get("mean")), _pct(a.get("ood_mean", {}).get("mean")),
                    _pct(a.get("ood_gain")), _pct(a.get("effective_robustness"))]
        if has_b2n:
            row += [_pct(a.get(k, {}).get("mean")) for k in ("base", "new", "hm")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Top-1 accuracy in %, mean ± std over seeds."]
    return "\n".join(lines) + "\n"


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, grid: bool = True) -> bytes:
    """Label, render to PNG and close one figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if grid:
        ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    png = _figure_png(fig)
    plt.close(fig)
    return png


def plot_figures(doc: dict) -> dict[str, bytes]:
    """PNG bytes of each plot the document supports, by file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[str, bytes] = {}
    aggs = _main_aggregates(doc)
    id_ood = [a for a in doc["aggregates"] if "id" in a and "ood_mean" in a]
    if id_ood:
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        for model in sorted({a["model"] for a in id_ood}, key=_model_key):
            pts = sorted((a for a in id_ood if a["model"] == model), key=lambda a: -1 if a["alpha"] is None else a["alpha"])
            xs = [100 * a["id"]["mean"] for a in pts]
            ys = [100 * a["ood_mean"]["mean"] for a in pts]
            line = ax.plot(xs, ys, "-o" if len(pts) > 1 else "o", label=model, markersize=5)[0]
            main = next((a for a in pts if a["alpha"] in (None, 1.0)), pts[-1])
            ax.errorbar(100 * main["id"]["mean"], 100 * main["ood_mean"]["mean"], xerr=100 * main["id"]["std"],
                        yerr=100 * main["ood_mean"]["std"], color=line.get_color(), capsize=3)
        figures["id_vs_ood.png"] = _finish(fig, ax, "ID top-1 (%)", "OOD mean top-1 (%)",
                                           "In-distribution vs out-of-distribution")

    datasets = sorted({d for a in aggs for d in a["per_dataset"]})
    if datasets:
        fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(datasets) + 2), 3.8))
        width = 0.8 / max(len(aggs), 1)
        for i, a in enumerate(aggs):
            xs = [j + i * width for j in range(len(datasets))]
            means = [100 * a["per_dataset"].get(d, {}).get("mean", float("nan")) for d in datasets]
            stds = [100 * a["per_dataset"].get(d, {}).get("std", 0.0) for d in datasets]
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=a["model"])
        ax.set_xticks([j + width * (len(aggs) - 1) / 2 for j in range(len(datasets))], datasets, rotation=30,
                      ha="right")
        figures["per_dataset.png"] = _finish(fig, ax, "", "top-1 (%)", "Per-dataset accuracy", grid=False)

    curves = {m: sorted((a for a in id_ood if a["model"] == m and a["alpha"] is not None), key=lambda a: a["alpha"])
              for m in {a["model"] for a in id_ood}}
    curves = {m: c for m, c in curves.items() if len(c) > 1}
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for model, pts in sorted(curves.items(), key=lambda kv: _model_key(kv[0])):
            alphas = [a["alpha"] for a in pts]
            line = ax.plot(alphas, [100 * a["id"]["mean"] for a in pts], "-o", markersize=4, label=f"{model} ID")[0]
            ax.plot(alphas, [100 * a["ood_mean"]["mean"] for a in pts], "--s", markersize=4,
                    color=line.get_color(), label=f"{model} OOD")
        figures["alpha_curve.png"] = _finish(fig, ax, "alpha (base + alpha * delta)", "top-1 (%)",
                                             "Interpolating the delta")
    return figures


def html_report(markdown: str, figures: dict[str, bytes], title: str) -> str:
    """A single self-contained page: the table (rendered from the Markdown) and the plots."""
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    table = ""
    if rows:
        header = [c.strip() for c in rows[0].strip("|").split("|")]
        body = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
        table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
        table += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
        table += "</table>"
    notes = [line[2:] for line in markdown.splitlines() if line.startswith("- ")]
    imgs = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, png in figures.items()
    )
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
             "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
             "figure{display:inline-block;margin:1em}img{max-width:520px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            + "".join(f"<p>{html.escape(n)}</p>" for n in notes)
            + table + "<p>Top-1 accuracy in %, mean ± std over seeds.</p>" + imgs + "</body></html>")


def write_report(doc: dict, out_dir: str | Path, title: str = "Evaluation report") -> dict[str, Path]:
    """Write report.md, report.html and the PNGs into ``out_dir`` (each file atomically)."""
    out = Path(out_dir)
    md = markdown_report(doc, title)
    figures = plot_figures(doc)
    written = {}
    for name, data in figures.items():
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
        written[name] = out / name
    for name, text in (("report.md", md), ("report.html", html_report(md, figures, title))):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written[name] = out / name
    return written
