"""Reports from a metrics document: Markdown plus one self-contained HTML page with plots.

The page holds, in order: the run's settings (model and base fingerprint, suite, data and
its version, effective-robustness reference), the methods (learning rate, steps, mask
density, trainable values, delta size), the accuracy table, base-to-new and effective
robustness tables where the suite has them, one line per aggregate saying how it was
computed, and the figures (:mod:`saft.eval.plots`): ID vs OOD, per dataset, base-to-new
HM, effective robustness, the base + alpha * delta curve when several alphas were
evaluated, where the mask landed per block and the training curves. The run context
(settings and per-delta facts) comes from the steps layer
(:func:`saft.steps.report_context.report_context`); without it only the document's own
facts are shown. A value without ``±`` comes from one seed: there is no spread to show.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from saft.eval.metrics import ZERO_SHOT
from saft.eval.plots import main_aggregates, model_key, plot_figures
from saft.io import atomic_path
from saft.layout import EVAL

CAPTION = "Top-1 accuracy in %: mean ± sample standard deviation over seeds; a value without ± comes from one seed."
FIGURE_CAPTIONS = {
    "id_vs_ood.png": "ID vs OOD mean top-1 per model (error bars: std over seeds, where there are several).",
    "per_dataset.png": "Top-1 per dataset and model.",
    "base_to_new.png": "Base-to-new: HM of mean base and mean new top-1, per dataset and averaged.",
    "effective_robustness.png": "Effective robustness per shift: OOD top-1 minus the reference fit's prediction.",
    "alpha_curve.png": "ID and OOD mean top-1 of base + alpha * delta.",
    "wiseft_alpha.png": "WiSE-FT: ID validation top-1 of base + alpha * (full fine-tuning's delta) against alpha, per "
                        "seed; the star marks the alpha chosen (Wortsman et al. 2022).",
    "mask_landing.png": "Trained entries per block (sparse deltas; mean over seeds).",
    "training_curves.png": "Training loss per optimizer step, one line per seed.",
}


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    css: str = ""  # "kv": a setting/value table, left-aligned


def fmt(stat: dict | None) -> str:
    """``61.23 ± 1.20`` (percent), ``61.23`` when there is no spread, ``-`` when missing."""
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{100 * stat['mean']:.2f}"
    return text if stat.get("std") is None else f"{text} ± {100 * stat['std']:.2f}"


def fmt_gain(value: float | None) -> str:
    if value is None:
        return "-"
    return "+0.00" if abs(value) < 5e-5 else f"{100 * value:+.2f}"


def _size(n_bytes: float) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"


def _span(values: list, show) -> str:
    values = sorted(set(v for v in values if v is not None))
    if not values:
        return "-"
    return show(values[0]) if len(values) == 1 else f"{show(values[0])} to {show(values[-1])}"


def settings_table(doc: dict, context: dict) -> Table:
    meta, settings, runs = doc.get("meta", {}), dict(context.get("settings", {})), context.get("runs", [])
    rows = []
    if meta.get("model"):
        fp = meta.get("base_fingerprint")
        rows.append(["model", f"{meta['model']}" + (f" (weights sha256 {fp[:12]}…)" if fp else "")])
    if meta.get("suite"):
        rows.append(["evaluation suite", str(meta["suite"])])
    data = settings.pop("data", None) or next((r["data"] for r in runs if r.get("data")), None)
    if data:
        rows.append(["training data", ", ".join(f"{k} {v}" for k, v in data.items() if v not in ("", None))])
    versions = sorted({(r.get("seed"), r["manifest_hash"]) for r in runs if r.get("manifest_hash")},
                      key=lambda sv: (sv[0] is None, sv[0] or 0, sv[1]))
    if versions:
        rows.append(["data version (train manifest sha256)",
                     "; ".join(f"seed {s}: {h[:12]}…" if s is not None else f"{h[:12]}…" for s, h in versions[:12])
                     + (f"; … {len(versions) - 12} more" if len(versions) > 12 else "")])
    seeds = sorted({s for a in doc["aggregates"] for s in a.get("seeds", [])})
    if seeds:
        rows.append(["seeds", ", ".join(map(str, seeds))])
    ref = meta.get("effective_robustness_reference")
    if ref:
        rows.append(["effective-robustness reference", f"{ref['name']} ({ref['transform']} fit; {ref['source']})"])
    rows += [[str(k), str(v)] for k, v in settings.items()]
    return Table("Run", ["setting", "value"], rows, css="kv")


def methods_table(context: dict) -> Table | None:
    runs = context.get("runs", [])
    if not runs:
        return None
    default_density = context.get("settings", {}).get("density")
    rows = []
    for method in sorted({r["method"] for r in runs}, key=model_key):
        mine = [r for r in runs if r["method"] == method]
        rows.append([method, _span([r.get("lr") for r in mine], lambda v: f"{v:g}"),
                     _span([r.get("steps") for r in mine], str), _update(mine, default_density),
                     _span([r["trainable"] for r in mine], lambda v: f"{v:,}"),
                     _span([r["delta_bytes"] for r in mine], _size), str(len(mine))])
    return Table("Methods", ["method", "learning rate", "steps", "update", "trainable values", "delta file", "runs"],
                 rows, ["Learning rates chosen on ID validation where a grid was searched; WiSE-FT evaluates full "
                        "fine-tuning's delta (its trainable values and file) at the alpha chosen on ID validation."])


def _update(runs: list[dict], default_density) -> str:
    """How the runs of one method change the model: mask density, low rank, dense, or full's delta at an alpha."""
    if any(r.get("alpha") is not None for r in runs):
        return "full's delta at alpha " + _span([r.get("alpha") for r in runs], lambda v: f"{v:g}")
    if all(r.get("sparse") for r in runs):
        return "sparse, density " + _span([r.get("density", default_density) for r in runs], lambda v: f"{v:.4%}")
    kinds = sorted({r.get("kind", "dense") for r in runs})
    return "; ".join(k.replace("dense", "dense (every eligible entry)", 1) if k.startswith("dense") else k
                     for k in kinds)


def matched_id_table(doc: dict, context: dict) -> Table | None:
    """OOD mean at one common ID accuracy, read off every method's base + alpha * delta curve."""
    from saft.eval.alpha_curve import ood_at_matched_id

    if not any(a["alpha"] not in (None, 0.0, 1.0) for a in doc["aggregates"]):
        return None  # with alpha 1 alone the curve would be a straight-line guess
    matched = ood_at_matched_id(doc["aggregates"])
    if not matched:
        return None
    for run in context.get("runs", []):  # a fixed-alpha run (WiSE-FT) lies on its delta's own method's curve
        if run.get("alpha") is not None and run.get("delta_method") in matched:
            matched[run["method"]] = matched[run["delta_method"]]
    rows = [[m, f"{100 * v:.2f}" if v is not None else "-"] for m, v in sorted(
        ((m, v) for m, v in matched.items() if m != "id"), key=lambda kv: model_key(kv[0]))]
    return Table(f"OOD mean at matched ID ({100 * matched['id']:.2f})", ["model", "OOD mean"], rows,
                 ["Each method's curve runs from zero-shot (alpha 0) through its evaluated alphas (of the seeds' "
                  "mean accuracies); the common ID level is the highest every curve reaches, OOD is interpolated "
                  "there. WiSE-FT shares full fine-tuning's curve."])


def accuracy_table(doc: dict) -> Table:
    aggs = main_aggregates(doc)
    roles = {d: v["role"] for a in aggs for d, v in a["per_dataset"].items()}
    order = {"id": 0, "id_subset": 1, "ood": 2, "base": 3, "new": 3}
    datasets = sorted(roles, key=lambda d: (order.get(roles[d], 9), d))
    has_id_ood = any("id" in a and "ood_mean" in a for a in aggs)
    has_b2n = any("hm" in a for a in aggs)
    has_er = any("effective_robustness" in a for a in aggs)
    head = ["model"] + [f"{d} ({roles[d]})" for d in datasets]
    head += (["ID", "OOD mean", "ID gain", "OOD gain"] if has_id_ood else [])
    head += (["eff. robustness"] if has_er else []) + (["base", "new", "HM"] if has_b2n else [])
    rows = []
    for a in aggs:
        row = [a["model"] if a["alpha"] in (None, 1.0) else f"{a['model']} @ alpha {a['alpha']:g}"]
        row += [fmt(a["per_dataset"].get(d)) for d in datasets]
        if has_id_ood:
            gains = [None, None] if a["model"] == ZERO_SHOT else [a.get("id_gain"), a.get("ood_gain")]
            row += [fmt(a.get("id")), fmt(a.get("ood_mean"))] + [fmt_gain(g) for g in gains]
        if has_er:
            row.append(fmt(a.get("effective_robustness")))
        if has_b2n:
            row += [fmt(a.get(k)) for k in ("base", "new", "hm")]
        rows.append(row)
    notes = [CAPTION] + (["Gains are in points against zero-shot."] if has_id_ood else [])
    return Table("Accuracy", head, rows, notes)


def base_to_new_table(doc: dict) -> Table | None:
    aggs = [a for a in main_aggregates(doc) if "base_to_new" in a]
    if not aggs:
        return None
    groups = sorted({g for a in aggs for g in a["base_to_new"]})
    head = ["dataset"] + [f"{a['model']} {k}" for a in aggs for k in ("base", "new", "HM")]
    rows = []
    for g in groups:
        row = [g]
        for a in aggs:
            cell = a["base_to_new"].get(g, {})
            row += [fmt(cell.get("base")), fmt(cell.get("new")), fmt(cell.get("hm"))]
        rows.append(row)
    rows.append([f"average over {len(groups)}"] + [fmt(a.get(k)) for a in aggs for k in ("base", "new", "hm")])
    return Table("Base-to-new", head, rows, [CAPTION, "HM: harmonic mean of the mean base and mean new accuracy."])


def effective_robustness_table(doc: dict) -> Table | None:
    aggs = [a for a in main_aggregates(doc) if "effective_robustness_per_shift" in a]
    if not aggs:
        return None
    shifts = sorted({s for a in aggs for s in a["effective_robustness_per_shift"]})
    rows = [[a["model"]] + [fmt(a["effective_robustness_per_shift"].get(s)) for s in shifts]
            + [fmt(a["effective_robustness"])] for a in aggs]
    ref = doc["meta"].get("effective_robustness_reference", {})
    notes = [f"Points above the {ref.get('transform', '')} fit of the reference {ref.get('name', '')!r}."]
    if doc.get("definitions", {}).get("effective_robustness_missing"):
        notes.append("Not reported: " + doc["definitions"]["effective_robustness_missing"])
    return Table("Effective robustness", ["model"] + shifts + ["average"], rows, notes)


def report_tables(doc: dict, context: dict | None = None) -> list[Table]:
    context = context or {}
    tables = [settings_table(doc, context), methods_table(context), accuracy_table(doc),
              matched_id_table(doc, context), base_to_new_table(doc), effective_robustness_table(doc)]
    return [t for t in tables if t is not None and t.rows]


def markdown_report(doc: dict, title: str = "Evaluation report", context: dict | None = None) -> str:
    lines = [f"# {title}", ""]
    for table in report_tables(doc, context):
        lines += [f"## {table.title}", "", "| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
        lines += ["| " + " | ".join(row) + " |" for row in table.rows]
        lines += [""] + [f"{note}  " for note in table.notes] + ([""] if table.notes else [])
    if doc.get("definitions"):
        lines += ["## How each number is computed", ""]
        lines += [f"- `{key}`: {text}" for key, text in doc["definitions"].items()] + [""]
    return "\n".join(lines) + "\n"


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in table.notes)
    css = f" class='{table.css}'" if table.css else ""
    return f"<h2>{html.escape(table.title)}</h2><table{css}><tr>{head}</tr>{body}</table>{notes}"


def html_report(doc: dict, figures: dict[str, bytes], title: str, context: dict | None = None) -> str:
    """One self-contained page: tables, definitions and the plots (PNG data URIs)."""
    parts = [_html_table(t) for t in report_tables(doc, context)]
    if doc.get("definitions"):
        items = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in doc["definitions"].items())
        parts.append(f"<h2>How each number is computed</h2><ul>{items}</ul>")
    if figures:
        imgs = "".join(
            f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            f"<figcaption>{html.escape(FIGURE_CAPTIONS.get(name, name))}</figcaption></figure>"
            for name, png in figures.items())
        parts.append(f"<h2>Figures</h2>{imgs}")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
             "table{border-collapse:collapse;font-size:13px;margin-bottom:.4em}td,th{border:1px solid #ccc;"
             "padding:3px 7px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
             "table.kv td,table.kv th{text-align:left}"
             ".note{font-size:12px;color:#555;margin:.2em 0}figure{display:inline-block;width:47%;margin:.5em 1%;"
             "vertical-align:top}img{max-width:100%}figcaption{font-size:12px;color:#555}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>" + "".join(parts) + "</body></html>")


def write_report(doc: dict, out_dir: str | Path, title: str = "Evaluation report",
                 context: dict | None = None) -> dict[str, Path]:
    """Write report.md, report.html and the PNGs into ``out_dir`` (each file atomically)."""
    out = Path(out_dir)
    figures = plot_figures(doc, context)
    written = {}
    for name, data in figures.items():
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
        written[name] = out / name
    for name in set(FIGURE_CAPTIONS) - set(figures):  # a figure of an earlier run must not outlive its data
        (out / name).unlink(missing_ok=True)
    pages = ((EVAL.report_md, markdown_report(doc, title, context)),
             (EVAL.report_html, html_report(doc, figures, title, context)))
    for name, text in pages:
        with atomic_path(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written[name] = out / name
    return written
