"""The results table and validity verdict printed by ``saft run``, the pipeline and ``saft benchmark synthshift``."""

from __future__ import annotations

_ORDER = ("zeroshot", "full", "saft", "random")


def _cell(stat: dict | None) -> str:
    if not stat:
        return "-"
    return f"{100 * stat['mean']:.1f}±{100 * stat['std']:.1f}"


def format_results(summary: dict) -> str:
    aggs = [a for a in summary["aggregates"] if a["alpha"] in (None, 1.0)]
    aggs.sort(key=lambda a: _ORDER.index(a["model"]) if a["model"] in _ORDER else 99)
    ood = sorted(d for d, v in aggs[0]["per_dataset"].items() if v["role"] == "ood")
    sizes = summary.get("sizes", {})
    head = ["method", "trainable", "delta", "ID"] + ood + ["OOD mean"]
    rows = []
    for a in aggs:
        size = sizes.get(a["model"], {})
        rows.append([
            a["model"],
            f"{size['trainable']:,}" if size else "0",
            f"{size['delta_bytes'] / 1024:.0f} KB" if size else "-",
            _cell(a.get("id")),
            *[_cell(a["per_dataset"].get(d)) for d in ood],
            _cell(a.get("ood_mean")),
        ])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head] + rows]
    lines.insert(1, "-" * len(lines[0]))
    lr = summary.get("chosen_lr", {})
    if lr:
        lines.append("learning rates (chosen on the ID validation split): "
                     + ", ".join(f"{m} {v}" for m, v in sorted(lr.items())))
    matched = summary.get("ood_at_matched_id") or {}
    if len(matched) > 2:
        lines.append(f"OOD mean at matched ID {100 * matched['id']:.1f} (along base + alpha * delta): "
                     + ", ".join(f"{m} {100 * v:.1f}" for m, v in sorted(matched.items()) if m != "id"))
    for method, landing in sorted((summary.get("masks") or {}).items()):
        lines.append(format_landing(method, landing))
    if summary.get("b2n"):
        lines += ["", format_b2n(summary["b2n"]["table"])]
    return "\n".join(lines)


def format_landing(method: str, landing: dict, top: int = 4) -> str:
    """One line: where the mask's entries fall (mean over seeds), the largest tensors first."""
    total = sum(landing["num_selected"]) / len(landing["num_selected"])
    items = list(landing["per_tensor"].items())
    parts = [f"{name} {count:.0f}" for name, count in items[:top]]
    rest = sum(count for _, count in items[top:])
    if rest:
        parts.append(f"{len(items) - top} other tensors {rest:.0f}")
    return f"{method} mask, {total:.0f} entries: " + ", ".join(parts)


def format_b2n(table: dict) -> str:
    """Base-to-new: base / new / harmonic mean per method, mean ± std over seeds."""
    models = sorted(table, key=lambda m: _ORDER.index(m) if m in _ORDER else 99)
    head = ["base-to-new", "base", "new", "HM"]
    rows = [[m, _cell(table[m]["base"]), _cell(table[m]["new"]), _cell(table[m]["hm"])] for m in models]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head] + rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_checks(summary: dict) -> str:
    if summary.get("checks_computed") is False:
        return ("validity checks not computed: they judge the world by full fine-tuning, which was not among "
                "the methods run")
    lines = []
    for name, ok in summary["checks"].items():
        lines.append(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    verdict = ("validity checks PASSED: the world shows the failure mode (full fine-tuning gains ID, loses OOD)"
               if summary["checks_passed"] else
               "!!! VALIDITY CHECKS FAILED: this world does not show the failure mode; "
               "SAFT's numbers on it do not mean anything !!!")
    return "\n".join(lines + [verdict])
