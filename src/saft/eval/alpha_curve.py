"""Reading accuracies off the base + alpha * delta curve (WiSE-FT-style interpolation)."""

from __future__ import annotations


def ood_at_matched_id(aggregates: list[dict]) -> dict:
    """OOD mean of each method at one common ID accuracy, read off its alpha curve.

    Each method's curve runs from the zero-shot point (alpha 0) through its evaluated
    alphas; the common ID level is the highest one every curve reaches, and OOD is
    linearly interpolated there. Needs alpha values below 1 to say much.
    """
    zs = next((a for a in aggregates if a["model"] == "zeroshot"), None)
    if zs is None:  # the curves start at the base model: without it there is nothing to read off
        return {}
    curves = {}
    for a in aggregates:
        if a["model"] != "zeroshot" and a["alpha"] is not None and "id" in a:
            curves.setdefault(a["model"], [(0.0, zs["id"]["mean"], zs["ood_mean"]["mean"])]).append(
                (a["alpha"], a["id"]["mean"], a["ood_mean"]["mean"]))
    if not curves:
        return {}
    target = min(max(p[1] for p in pts) for pts in curves.values())
    out = {"id": target}
    for model, pts in curves.items():
        pts.sort()
        value = None
        for (_, i0, o0), (_, i1, o1) in zip(pts, pts[1:]):
            if min(i0, i1) <= target <= max(i0, i1):
                value = o0 if i1 == i0 else o0 + (o1 - o0) * (target - i0) / (i1 - i0)
                break
        out[model] = value if value is not None else next(o for _, i, o in pts if i == target)
    return out
