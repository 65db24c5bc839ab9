"""The results table and validity verdict printed by ``saft run``, the pipeline and ``saft benchmark synthshift``."""

from __future__ import annotations

_ORDER = ("zeroshot", "full", "wiseft", "lpft", "lora", "saft", "random")


def _cell(stat: dict | None) -> str:
    """``61.2±1.3`` in percent; a bare ``61.2`` where there is no spread (one seed, an HM of means)."""
    if not stat:
        return "-"
    mean = f"{100 * stat['mean']:.1f}"
    return mean if stat.get("std") is None else f"{mean}±{100 * stat['std']:.1f}"


def _grid(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head] + rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def format_results(summary: dict) -> str:
    """One row per method: sizes, then ID / each OOD set / OOD mean, or base / new / HM on a base-to-new suite."""
    aggs = [a for a in summary["aggregates"] if a["alpha"] in (None, 1.0)]
    aggs.sort(key=lambda a: _ORDER.index(a["model"]) if a["model"] in _ORDER else 99)
    sizes = summary.get("sizes", {})
    id_ood = any("id" in a and "ood_mean" in a for a in aggs)
    ood = sorted(d for d, v in aggs[0]["per_dataset"].items() if v["role"] == "ood")
    er = any("effective_robustness" in a for a in aggs)
    if id_ood:
        head = ["method", "trainable", "delta", "ID"] + ood + ["OOD mean"] + (["eff. robustness"] if er else [])
    else:
        head = ["method", "trainable", "delta", "base", "new", "HM"]
    rows = []
    for a in aggs:
        size = sizes.get(a["model"], {})
        row = [a["model"], f"{size['trainable']:,}" if size else "0",
               f"{size['delta_bytes'] / 1024:.0f} KB" if size else "-"]
        if id_ood:
            row += [_cell(a.get("id")), *[_cell(a["per_dataset"].get(d)) for d in ood], _cell(a.get("ood_mean"))]
            row += [_cell(a.get("effective_robustness"))] if er else []
        else:
            row += [_cell(a.get(k)) for k in ("base", "new", "hm")]
        rows.append(row)
    lines = _grid(head, rows)
    groups = sorted({g for a in aggs for g in a.get("base_to_new", {})})
    if len(groups) > 1:
        lines.append("HM per dataset: " + "; ".join(
            f"{g} " + ", ".join(f"{a['model']} {_cell(a['base_to_new'][g]['hm'])}" for a in aggs
                                if g in a.get("base_to_new", {})) for g in groups))
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
    """Base-to-new per method: base and new as mean ± std over seeds, HM of the two means."""
    models = sorted(table, key=lambda m: _ORDER.index(m) if m in _ORDER else 99)
    head = ["base-to-new", "base", "new", "HM"]
    rows = [[m, _cell(table[m]["base"]), _cell(table[m]["new"]), _cell(table[m]["hm"])] for m in models]
    return "\n".join(_grid(head, rows))


def format_checks(summary: dict) -> str:
    if summary.get("checks_computed") is False:
        return ("validity checks not computed: they judge the world by full fine-tuning, which was not among "
                "the methods run")
    lines = []
    for name, ok in summary["checks"].items():
        if ok is None:
            lines.append(f"  [ -- ] {name}: not computed, alpha 0.5 was not evaluated "
                         "(saft run: --set evaluate.alphas=[0.5,1.0]; saft benchmark synthshift: --alpha 0.5 1)")
        else:
            lines.append(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    verdict = ("validity checks PASSED: the world has the structure the claim needs (full fine-tuning gains ID "
               "and little OOD)"
               if summary["checks_passed"] else
               "!!! VALIDITY CHECKS FAILED: this world does not show the failure mode; "
               "SAFT's numbers on it do not mean anything !!!")
    return "\n".join(lines + [verdict])
